"""`engine: command` end to end through `avatar gen`, with a stand-in model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from standin_model import frame_loudness, read_stamps, read_wav_mono

from avatarcli.media import streams as m

pytestmark = pytest.mark.slow
STANDIN = Path(__file__).resolve().parent / "standin_model.py"


def preset_file(tmp: Path, *, outdir: bool = False, fps: int = 30, **extra: object) -> Path:
    where = ["--result_dir", "{outdir}"] if outdir else ["--out", "{out}"]
    data = {
        "engine": "command", "size": "256*256", "clips_per_batch": 2,
        "command": {"template": [sys.executable, str(STANDIN), "--audio", "{audio}",
                                 "--image", "{image}", *where, "--fps", str(fps),
                                 "--batch", "{batch}"],
                    **({"output": "*.mp4"} if outdir else {})},
        **extra,
    }
    path = tmp / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def gen(audio: Path, image: Path, out: Path, preset: Path, *extra: str,
        mode: str = "success") -> subprocess.CompletedProcess[str]:
    env = {"STANDIN_MODE": mode, "PATH": "/usr/bin:/bin"}
    import os

    return subprocess.run(
        [sys.executable, "-m", "avatarcli", "gen", str(audio), str(image), "-o", str(out),
         "-p", str(preset), "--json", *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
        stdin=subprocess.DEVNULL)


def test_model_at_another_fps_is_retimed_and_joined(media: dict[str, Path],
                                                     tmp_path: Path) -> None:
    # Paths with spaces, quotes, non-ASCII and a leading dash: no shell is involved.
    folder = tmp_path / "my 'odd' folder ü"
    folder.mkdir()
    image = folder / "-face \"x\".png"
    shutil.copy(media["portrait"], image)
    out = folder / "talk.mp4"
    run = gen(media["speech6"], image, out, preset_file(tmp_path, fps=30))
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["batches"] == 2 and summary["frames"] == 150
    assert m.video_frames(out) == 150
    assert abs(m.audio_seconds(out) - 6.0) <= 0.04
    assert m.probe(out).first("video").fps == 25  # type: ignore[union-attr]


def test_stamps_show_each_frame_came_from_its_own_batch_frame_and_sound(
        media: dict[str, Path], tmp_path: Path) -> None:
    """Decode what produced every output frame: the batch, the model's frame (30 fps re-timed
    to 25) and the loudness of the audio it was given, which must be the loudness of the
    original recording at that frame's own time (a slice given late or early, parts joined out
    of order or a wrong re-timing all fail here)."""
    out = tmp_path / "t.mp4"
    # No seam overlap: its crossfaded frames blend two batches' stamps (tests/test_seams.py).
    run = gen(media["speech6"], media["portrait"], out,
              preset_file(tmp_path, fps=30, seam_overlap=0))
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)["plan"]
    assert len(plan) == 2
    stamps = read_stamps(out)
    assert len(stamps) == 150
    samples, rate = read_wav_mono(media["speech6"])
    errors = []
    for b in plan:
        for k in range(b["frame_start"], b["frame_end"]):
            s = stamps[k]
            assert s.batch == b["index"], f"frame {k} came from batch {s.batch}"
            j = k - b["frame_start"]
            # The model's last frame may be repeated to fill the batch (its video ends a frame
            # or two short of the audio: the model's own rounding, the normalise pads it).
            padded = b["frame_end"] - k <= 2 and s.index == stamps[k - 1].index
            assert abs(s.index - j * 30 / 25) <= 1 or padded, f"frame {k}: model frame {s.index}"
            # The batch's audio starts at its first frame's time, frame_start / 25 (not the
            # plan's own start_s, which a bug in the plan would shift along with the slice).
            start = b["frame_start"] / 25
            own = frame_loudness(samples[round(start * rate):], rate, 30, s.index)
            errors.append(abs(s.loudness - own))
    # Loudness in thirds of a dB; the model heard a 16 kHz copy, so allow 1 dB of resampling.
    # Measured: median 0, 95th percentile 2; the slice 0.04 s late: median 5, 95th 86.
    assert np.median(errors) <= 1 and np.percentile(errors, 95) <= 3, sorted(errors)[-20:]
    assert any(stamps[k].loudness > stamps[0].loudness + 60 for k in range(150))  # not silence


def test_outdir_and_glob(media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.mp4"
    run = gen(media["speech6"], media["portrait"], out, preset_file(tmp_path, outdir=True))
    assert run.returncode == 0, run.stderr
    assert m.video_frames(out) == 150


@pytest.mark.parametrize(("mode", "code", "message", "failure"), [
    ("crash", 3, "exited with 1", "crash"),
    ("oom", 4, "out of memory", "oom"),
    ("nofile", 3, "wrote no video", "crash"),
    ("short", 3, "the batch needs", "crash"),
])
def test_failures_are_reported_and_recorded(media: dict[str, Path], tmp_path: Path, mode: str,
                                            code: int, message: str, failure: str) -> None:
    out = tmp_path / "t.mp4"
    run = gen(media["speech6"], media["portrait"], out, preset_file(tmp_path), mode=mode)
    assert run.returncode == code, run.stderr
    assert message in run.stderr
    assert "batch-0000.log" in run.stderr  # the failure points at the log
    assert not out.exists()
    manifest = json.loads((tmp_path / "t.mp4.parts" / "manifest.json").read_text())
    assert manifest["parts"][0]["state"] == "failed"
    assert manifest["parts"][0]["failure"] == failure
    # The rest was cancelled, not run.
    assert all(p["state"] == "pending" for p in manifest["parts"][1:])


def test_template_problems_are_caught_before_launch(media: dict[str, Path],
                                                    tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"engine": "command",
                                   "command": {"template": ["nosuchmodel", "{audio}", "{outt}"]}}))
    run = gen(media["speech6"], media["portrait"], tmp_path / "t.mp4", bad)
    assert run.returncode == 2
    assert "unknown placeholder {outt}" in run.stderr
    assert "nosuchmodel: command not found" in run.stderr
    assert not (tmp_path / "t.mp4.parts").exists()


def test_dry_run_prints_each_command(media: dict[str, Path], tmp_path: Path) -> None:
    run = gen(media["speech6"], media["portrait"], tmp_path / "t.mp4", preset_file(tmp_path),
              "--dry-run")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)["plan"]
    assert len(plan) == 2
    assert "standin_model.py --audio" in plan[1]["command"]
    assert "batch-0001.wav" in plan[1]["command"]


def test_hung_model_is_stopped_retried_once_then_fails_resumably(media: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    import psutil

    out = tmp_path / "t.mp4"
    preset = preset_file(tmp_path)
    # 6 s: time enough for a loaded machine to start the batch and the model; the model hangs.
    run = gen(media["speech6"], media["portrait"], out, preset, "--set", "batch_timeout_s=6",
              mode="hang")
    assert run.returncode == 3, run.stderr
    assert "batch 0 failed (timed out after 6 s (batch_timeout_s) and was stopped)" in run.stderr
    assert not out.exists()
    job = tmp_path / "t.mp4.parts"
    log = (job / "logs" / "batch-0000.log").read_text()
    launches = [ln for ln in log.splitlines() if ln.startswith("# ") and "avatarcli.worker" in ln]
    assert len(launches) == 2  # the first launch and one retry
    assert "standin: mode=hang" in log  # the model was running (hung) when it was stopped
    manifest = json.loads((job / "manifest.json").read_text())
    assert [p["state"] for p in manifest["parts"]] == ["failed", "pending"]
    assert manifest["parts"][0]["failure"] == "timeout"
    # The hung model went with its batch process (the whole process group was killed); the
    # kernel may take a moment to finish a process it signalled, so allow it a bound.
    def alive() -> list[list[str]]:
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            try:
                if p.info["status"] != psutil.STATUS_ZOMBIE and any(
                        str(job) in a for a in p.info["cmdline"] or []):
                    found.append(p.info["cmdline"])
            except psutil.Error:
                continue
        return found

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive() == []
    # Resumable: the job survives a change of the limit (it changes no pixel) and renders once
    # the model behaves; the default limit (6 h for a command model) leaves a loaded machine be.
    again = gen(media["speech6"], media["portrait"], out, preset)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["batches_rendered"] == [0, 1]
    assert len(read_stamps(out)) == 150


def test_batch_timeout_defaults_follow_the_engine() -> None:
    from avatarcli import presets
    from avatarcli.engines import timeout_s as batch_timeout_s
    from avatarcli.engines.base import TIMEOUT_UNKNOWN_S

    builtin = presets.resolve("cpu-preview").preset
    assert builtin.batch_timeout_s == 0  # derived unless a preset sets it
    assert batch_timeout_s(builtin, 1200) == 300 + 2.0 * 1200
    live = presets.resolve("liveavatar-80gb").preset
    assert batch_timeout_s(live, 1200) == 1800 + 20.0 * 1200
    command = presets.resolve("example-wav2lip").preset
    assert batch_timeout_s(command, 1200) == TIMEOUT_UNKNOWN_S
    assert batch_timeout_s(presets.resolve("cpu-preview", {"batch_timeout_s": 90}).preset,
                           1200) == 90
