"""The engine draws only the animator's changed box and pipes YUV: the same frames as
converting render()'s whole frames."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import LOSSLESS
from PIL import Image

from avatarcli.engines.builtin import engine
from avatarcli.engines.builtin.animate import Animator, mouth_openness, mouth_spread
from avatarcli.engines.builtin.face import FaceLayout, fallback_layout, layout_from_box
from avatarcli.job import JobDir
from avatarcli.media import streams as avmedia

FPS = 25.0


def i420(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV_I420)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    rng = np.random.default_rng(11)  # noise: any pixel drawn wrong shows
    return rng.integers(0, 256, (240, 212, 3), dtype=np.uint8)


@pytest.mark.parametrize("layout", [
    layout_from_box(61.0, 37.0, 97.0, 101.0),  # odd corners: the box must round outwards
    fallback_layout(212, 240),
])
def test_box_frames_are_render_frames(portrait: np.ndarray, layout: FaceLayout) -> None:
    n = 90
    rng = np.random.default_rng(2)
    idx = np.arange(n, dtype=np.int64) + 3010  # blinks and head motion on
    openness = np.clip(rng.random(n) * 1.4 - 0.2, 0.0, 1.0)
    openness[:5] = 0.0  # closed lips too
    spread = np.clip(rng.normal(0.0, 0.8, n), -1.0, 1.0)
    whole = Animator(portrait, layout, seed=5, fps=FPS).render(idx, openness, spread)
    animator = Animator(portrait, layout, seed=5, fps=FPS)
    box = animator.changed_box
    assert box is not None and all(v % 2 == 0 for v in box)
    x0, y0, x1, y1 = box
    static = i420(portrait)
    buf = static.copy()
    changed = np.zeros(portrait.shape[:2], bool)
    for k in range(n):
        # Out of order and reusing one buffer, as the engine's ring does.
        got = animator.render_box(int(idx[k]), float(openness[k]), float(spread[k]))
        assert np.array_equal(got, whole[k, y0:y1, x0:x1])
        engine.paste_i420(buf, got, box)
        assert np.array_equal(buf, i420(whole[k])), k
        changed |= (whole[k] != portrait).any(axis=2)
    outside = changed.copy()
    outside[y0:y1, x0:x1] = False
    assert changed.any() and not outside.any()


def test_the_engine_pipes_the_animators_frames(media: dict[str, Path], tmp_path: Path) -> None:
    """A whole job (lossless, more chunks than the ring holds) decodes to exactly the I420
    of the frames render() gives for the job's portrait, layout and features."""
    out = tmp_path / "talk.mp4"
    run = subprocess.run([sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]),
                          str(media["portrait"]), "-o", str(out), *LOSSLESS, "--keep-parts",
                          "--json"], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["batches"] == 1
    job = JobDir.for_output(out)
    manifest = job.load()
    with Image.open(job.portrait) as im:  # the pixels as PIL reads them (the engine: OpenCV)
        rgb = np.asarray(im.convert("RGB"))
    features = np.load(job.features)
    values = manifest["preset"]["values"]
    animator = Animator(rgb, FaceLayout.from_dict(manifest["engine_state"]["layout"]),
                        seed=values["seed"], fps=result["fps"])
    frames = list(avmedia.read_frames(out, width=result["width"], height=result["height"]))
    n = result["frames"]
    assert len(frames) == n > engine.RING_CHUNKS * engine.CHUNK_FRAMES
    openness = mouth_openness(features, values["builtin"]["mouth_gain"])
    want = animator.render(np.arange(n), openness, mouth_spread(features))
    wrong = [k for k in range(n) if not np.array_equal(frames[k], i420(want[k]))]
    assert not wrong, f"{len(wrong)} frames differ, first {wrong[:5]}"
