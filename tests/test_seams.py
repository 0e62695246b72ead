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

import pytest
import yaml

from avatarcli import check
from avatarcli.media import streams as m

pytestmark = pytest.mark.slow
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


def test_overlap_crossfades_each_seam_and_keeps_sync_and_frames(media: dict[str, Path],
                                                                tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    # No seam_overlap given: the command engine restarts each batch, so auto gives 8 frames.
    run = gen(media["speech6"], media["portrait"], out, model_preset(tmp_path), "--keep-parts")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["frames"] == 150 and summary["batches"] == 3
    # Each part after the first holds 8 frames rendered before its boundary.
    parts = sorted((tmp_path / "talk.mp4.parts" / "parts").glob("part-*.mp4"))
    plan = summary["plan"]
    assert [m.video_frames(p) for p in parts] == [
        b["frame_end"] - b["frame_start"] + (8 if b["index"] else 0) for b in plan]
    report = check.check(out)
    seams = report.items["seams"].figures
    assert seams["overlap_frames"] == 8
    assert [s["frame"] for s in seams["seams"]] == [b["frame_start"] for b in plan[1:]]
    # The bound: with a 0.4 px/frame drift (a 20 px jump back at each seam, over 20x the
    # median change without an overlap), every change from the overlap's start to one frame
    # past the seam stays within 4x the median frame-to-frame change.
    assert seams["max_ratio"] <= 4.0, seams
    assert report.ok, report.lines()
    assert report.items["sync"].figures["lag_frames"] == 0
    assert report.frames == 150 and m.video_frames(out) == 150
    assert abs(m.audio_seconds(out) - 6.0) <= 0.04
    assert summary["check"]["ok"] is True

    # Resume: the parts (with their overlap) are whole, so nothing is rendered again.
    out.unlink()
    again = gen(media["speech6"], media["portrait"], out, model_preset(tmp_path))
    assert again.returncode == 0, again.stderr
    resumed = json.loads(again.stdout)
    assert resumed["batches_reused"] == [0, 1, 2] and resumed["batches_rendered"] == []
    assert m.video_frames(out) == 150


def test_dry_run_shows_each_launch_starting_before_its_boundary(media: dict[str, Path],
                                                                tmp_path: Path) -> None:
    run = gen(media["speech6"], media["portrait"], tmp_path / "t.mp4", model_preset(
        tmp_path, command={"template": ["echo", "{audio}", "{out}", "{start_s}", "{frames}"]}),
        "--dry-run")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)["plan"]
    for b in plan[1:]:
        # The engine is handed the extended range: 8 frames (0.32 s) earlier, 8 more frames.
        start_s, frames = b["command"].split()[-2:]
        assert float(start_s) == pytest.approx(b["start_s"] - 0.32, abs=1e-3)
        assert int(frames) == b["frame_end"] - b["frame_start"] + 8


def test_batch_rows_carry_the_check_figures(media: dict[str, Path], tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text(f"audio,image,output\n{media['speech6']},{media['portrait']},a.mp4\n")
    env = {**os.environ, "STANDIN_MODE": "talk", "STANDIN_DRIFT": str(DRIFT_PX)}
    run = subprocess.run(
        [sys.executable, "-m", "avatarcli", "batch", str(rows), "-p",
         str(model_preset(tmp_path)), "--json"],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)["rows"][0]
    assert row["status"] == "done"
    assert row["check"]["ok"] is True and row["check"]["lag_frames"] == 0
    assert row["check"]["seam_max_ratio"] <= 4.0


def test_progress_counts_planned_frames_with_an_overlap(media: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    from collections.abc import Iterator
    from typing import Any

    from avatarcli import presets
    from avatarcli.pipeline import Events, generate

    counted: list[int] = []

    class Counting(Events):
        @contextlib.contextmanager
        def progress(self, total_frames: int, done_frames: int) -> Iterator[Any]:
            class Bar:
                def update(self, n: int) -> None:
                    counted.append(n)

            yield Bar()

    monkeypatch.setenv("STANDIN_MODE", "talk")
    resolved = presets.resolve(str(model_preset(tmp_path)), {})
    result = generate(media["speech6"], media["portrait"], resolved, output=tmp_path / "t.mp4",
                      events=Counting())
    assert result.frames == 150 and len(result.batches) == 3
    assert sum(counted) == 150  # not 166: the 2 x 8 overlap frames are not counted twice
