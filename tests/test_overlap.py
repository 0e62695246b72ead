"""Seam overlap arithmetic (plan.lead_frames/render_range) and the crossfade itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatarcli import engines
from avatarcli.media import assemble, streams
from avatarcli.options import Preset
from avatarcli.plan import Batch, lead_frames, make_plan, render_range

W, H, FPS = 64, 48, 25


def test_render_ranges_extend_every_batch_but_the_first() -> None:
    plan = make_plan(300, fps=FPS, width=W, height=H, infer_frames=10, clips_per_batch=3)
    for i, b in enumerate(plan.batches):
        r = render_range(plan, i, 8)
        assert r.frame_end == b.frame_end and r.index == b.index
        assert r.frame_start == (b.frame_start - 8 if i else 0)
        assert r.clips == -(-r.frames // 10)
    assert render_range(plan, 2, 0) == plan.batches[2]
    # Never more than the previous batch holds.
    batches = (Batch(0, 0, 5, 1), Batch(1, 5, 40, 4))
    assert lead_frames(batches, 1, 8) == 5 and lead_frames(batches, 0, 8) == 0


def test_auto_overlap_only_for_engines_that_restart() -> None:
    assert engines.seam_overlap(Preset(engine="builtin")) == 0
    assert engines.seam_overlap(Preset(engine="command")) == 8
    assert engines.seam_overlap(Preset(engine="liveavatar")) == 8
    assert engines.seam_overlap(Preset(engine="liveavatar", seam_overlap=0)) == 0
    assert engines.seam_overlap(Preset(engine="builtin", seam_overlap=3)) == 3


def flat_part(path: Path, values: list[int]) -> Path:
    """A part whose frame k is a flat grey of values[k] (luma), losslessly coded."""
    with streams.VideoWriter(path, width=W, height=H, fps=FPS, crf=0, preset="ultrafast",
                           pix_fmt="yuv420p") as writer:
        for v in values:
            frame = np.full((H * 3 // 2, W), 128, np.uint8)
            frame[:H] = v
            writer.write(frame[None])
    return path


def test_crossfade_blends_the_overlap_linearly_and_writes_each_frame_once(
        tmp_path: Path) -> None:
    a = flat_part(tmp_path / "a.mp4", [40] * 10)
    # Part b repeats a's last 4 frames (its lead), then goes on.
    b = flat_part(tmp_path / "b.mp4", [240] * 4 + [200] * 6)
    out = tmp_path / "joined.mp4"
    written = assemble.crossfade([a, b], [0, 4], out, width=W, height=H, fps=FPS)
    assert written == 16 and streams.video_frames(out) == 16
    lumas = [float(f[:H].mean()) for f in streams.read_frames(out, width=W, height=H)]
    # Frames 6-9: a faded into b's lead with weights 1/5 .. 4/5.
    want = [40] * 6 + [40 + (240 - 40) * k / 5 for k in range(1, 5)] + [200] * 6
    assert lumas == pytest.approx(want, abs=1.5)


def test_crossfade_refuses_parts_too_short_for_their_overlap(tmp_path: Path) -> None:
    a = flat_part(tmp_path / "a.mp4", [40] * 3)
    b = flat_part(tmp_path / "b.mp4", [240] * 6)
    with pytest.raises(assemble.VerifyError, match="too few"):
        assemble.crossfade([a, b], [0, 4], tmp_path / "j.mp4", width=W, height=H, fps=FPS)
