"""Model engines through `avatar gen`: the finished video is checked, and seams between
batches are crossfaded over an overlap so a model that restarts each batch does not jump.

The stand-in model (`STANDIN_MODE=talk`) opens a mouth with the loudness and drifts the
picture from the first frame of every launch, as a restarting model does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

STANDIN = Path(__file__).resolve().parent / "standin_model.py"
DRIFT_PX = 0.4  # per frame from the launch's start: 20 px after a 50-frame batch


def model_preset(tmp: Path, **extra: object) -> Path:
    data = {
        "engine": "command", "size": "256*256", "infer_frames": 25, "clips_per_batch": 2,
        "command": {"template": [sys.executable, str(STANDIN), "--audio", "{audio}",
                                 "--image", "{image}", "--out", "{out}", "--fps", "25"]},
        **extra,
    }
    path = tmp / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def gen(audio: Path, image: Path, out: Path, preset: Path, *extra: str,
        drift: float = DRIFT_PX) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STANDIN_MODE": "talk", "STANDIN_DRIFT": str(drift)}
    return subprocess.run(
        [sys.executable, "-m", "avatarcli", "gen", str(audio), str(image), "-o", str(out),
         "-p", str(preset), "--json", *extra],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


def test_gen_checks_a_model_engines_video_and_keeps_the_figures(media: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    run = gen(media["speech6"], media["portrait"], out, model_preset(tmp_path), "--keep-parts",
              "--set", "seam_overlap=0")
    assert run.returncode == 0, run.stderr  # a failed check warns; the video is still made
    summary = json.loads(run.stdout)
    figures = summary["check"]
    # Without an overlap the drift jumps back at both seams; sync, length, frames hold.
    assert figures["failed"] == ["seams"], figures
    assert figures["lag_frames"] == 0 and figures["sync_corr"] >= 0.4
    assert figures["black_frames"] == 0 and figures["seam_max_ratio"] > 10
    assert any("check seams failed" in w for w in summary["warnings"])
    assert not any("lip sync" in w for w in summary["warnings"])
    manifest = json.loads((tmp_path / "talk.mp4.parts" / "manifest.json").read_text())
    assert manifest["check"]["checks"]["sync"]["figures"]["lag_frames"] == 0
    assert manifest["check"]["checks"]["length"]["ok"] is True
    # --no-check: no figures (and the job is the same one: the output is not re-rendered).
    again = gen(media["speech6"], media["portrait"], out, model_preset(tmp_path), "--force",
                "--no-check", "--set", "seam_overlap=0")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["check"] == {}
