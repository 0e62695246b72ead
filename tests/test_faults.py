"""Faults a cron job meets: signals, a killed parent, a second run, damaged state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fixtures
import psutil
import pytest
import yaml
from conftest import LOSSLESS, gone

from avatarcli.media import streams as m

pytestmark = pytest.mark.slow
STANDIN = Path(__file__).resolve().parent / "standin_model.py"
Reference = Callable[[str], list[str]]


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "avatarcli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def avatar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "avatarcli", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def gen_args(media: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["gen", str(media["speech30"]), str(media["portrait"]), "-o", str(out),
            "--set", "clips_per_batch=4", *LOSSLESS, *extra]


def held_job(tmp_path: Path, out: Path, audio: Path, image: Path,
             ) -> tuple[subprocess.Popen[str], Path, Path]:
    """A gen whose model (the stand-in in hang mode) holds its job until `release` exists.

    Returns the process, the release file and the preset; no timing margin is involved."""
    preset = tmp_path / "held.yaml"
    preset.write_text(yaml.safe_dump({
        "engine": "command", "size": "256*256",
        "command": {"template": [sys.executable, str(STANDIN), "--audio", "{audio}",
                                 "--image", "{image}", "--out", "{out}"]}}))
    release = tmp_path / "release"
    proc = start("gen", str(audio), str(image), "-o", str(out), "-p", str(preset),
                 env={"STANDIN_MODE": "hang", "STANDIN_RELEASE": str(release)})
    log = out.with_name(out.name + ".parts") / "logs" / "batch-0000.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "standin: mode=hang" in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the model never started"
        time.sleep(0.05)
    return proc, release, preset


def wait_for_running_batch(manifest: Path, proc: subprocess.Popen[str],
                           timeout: float = 120) -> int:
    """The pid of a batch process that is running after at least one part is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "avatar exited before a batch could be caught running"
        try:
            parts = json.loads(manifest.read_text())["parts"]
        except (OSError, ValueError, KeyError):
            parts = []
        done = [p for p in parts if p["state"] == "done"]
        running = [p for p in parts if p["state"] == "running" and p["pid"]]
        if done and running:
            return int(running[0]["pid"])
        time.sleep(0.05)
    raise AssertionError("no batch reached the running state")


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def resume_and_check(media: dict[str, Path], out: Path, done_before: list[int],
                     reference: Reference) -> None:
    rerun = avatar(*gen_args(media, out), "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["batches_reused"] == done_before
    assert sorted(summary["batches_rendered"]) == sorted(set(range(4)) - set(done_before))
    assert abs(m.audio_seconds(out) - 30.0) <= 0.04
    # Frame for frame the uninterrupted single-batch render: kept parts and new ones in place.
    assert fixtures.video_frame_md5s(out) == reference("speech30")


def done_parts(manifest: Path) -> list[int]:
    return sorted(p["index"] for p in json.loads(manifest.read_text())["parts"]
                  if p["state"] == "done")


def test_sigkill_of_a_batch_process_costs_only_that_batch(media: dict[str, Path], tmp_path: Path,
        reference_md5s: Reference) -> None:
    out = tmp_path / "talk.mp4"
    proc = start(*gen_args(media, out))
    manifest = tmp_path / "talk.mp4.parts" / "manifest.json"
    os.kill(wait_for_running_batch(manifest, proc), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert "killed by signal 9" in stderr and "batch-" in stderr
    assert not out.exists()
    states = {p["state"] for p in json.loads(manifest.read_text())["parts"]}
    assert "failed" in states and "running" not in states
    resume_and_check(media, out, done_parts(manifest), reference_md5s)


@pytest.mark.parametrize(("sig", "name"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_a_stop_signal_stops_the_batch_and_the_job_resumes(
        sig: signal.Signals, name: str, media: dict[str, Path], tmp_path: Path,
        reference_md5s: Reference) -> None:
    out = tmp_path / "talk.mp4"
    proc = start(*gen_args(media, out))
    manifest = tmp_path / "talk.mp4.parts" / "manifest.json"
    worker = wait_for_running_batch(manifest, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr  # 143 for SIGTERM, 130 for SIGINT
    assert f"interrupted ({name})" in stderr and "Traceback" not in stderr
    assert gone(worker), f"the batch process outlived its parent's {name}"
    states = [p["state"] for p in json.loads(manifest.read_text())["parts"]]
    assert "running" not in states and "failed" not in states  # interrupted, not failed
    resume_and_check(media, out, done_parts(manifest), reference_md5s)


def test_sigkill_of_the_parent_leaves_no_orphan(media: dict[str, Path], tmp_path: Path,
        reference_md5s: Reference) -> None:
    out = tmp_path / "talk.mp4"
    proc = start(*gen_args(media, out))
    manifest = tmp_path / "talk.mp4.parts" / "manifest.json"
    worker = wait_for_running_batch(manifest, proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert gone(worker), "the batch process kept rendering after its parent died"
    assert processes_mentioning(str(tmp_path / "talk.mp4.parts")) == []
    # The manifest still says "running" (nobody was left to say otherwise): resume copes.
    resume_and_check(media, out, done_parts(manifest), reference_md5s)
    assert processes_mentioning(str(tmp_path / "talk.mp4.parts")) == []


def test_second_run_on_a_busy_job_exits_75(media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    first, release, preset = held_job(tmp_path, out, media["speech6"], media["portrait"])
    second = avatar("gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out),
                    "-p", str(preset))
    assert second.returncode == 75, second.stderr
    assert f"busy, rendered by pid {first.pid} on " in second.stderr
    release.touch()
    _, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr  # the second run did not disturb the first
    assert m.video_frames(out) == 150


def test_busy_row_in_a_batch_is_skipped_with_75(media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    first, release, preset = held_job(tmp_path, out, media["speech6"], media["portrait"])
    other = tmp_path / "other.mp4"
    manifest = tmp_path / "rows.csv"
    manifest.write_text(f"audio,image,output,preset\n"
                        f"{media['speech6']},{media['portrait']},{out},{preset}\n"
                        f"{media['speech6']},{media['portrait']},{other},\n")
    batch = avatar("batch", str(manifest), "--json")
    assert batch.returncode == 75, batch.stderr
    assert [r["status"] for r in json.loads(batch.stdout)["rows"]] == ["busy", "done"]
    release.touch()
    first.communicate(timeout=180)
    assert first.returncode == 0


def test_rerecorded_input_at_the_same_path_is_not_mixed_into_the_old_job(
        media: dict[str, Path], tmp_path: Path, reference_md5s: Reference) -> None:
    """Jobs are keyed by content: a new recording under the old name is refused by `gen`
    (the job holds parts of the old one) and never skipped by `batch`."""
    audio = tmp_path / "lesson.wav"
    audio.write_bytes(media["speech6"].read_bytes())
    out = tmp_path / "lesson.mp4"
    args = ["gen", str(audio), str(media["portrait"]), "-o", str(out), *LOSSLESS,
            "--set", "clips_per_batch=1", "--keep-parts"]
    assert avatar(*args).returncode == 0
    out.unlink()
    fixtures.speech_track(audio, seconds=6.0, seed=5)  # re-recorded, same name and length
    refused = avatar(*args)
    assert refused.returncode == 2 and "different inputs or settings" in refused.stderr
    assert not out.exists()

    # batch: the old output (from the first recording) must be rendered again, not skipped.
    audio.write_bytes(media["speech6"].read_bytes())
    assert avatar(*args, "--force").returncode == 0
    old = fixtures.video_frame_md5s(out)
    assert old == reference_md5s("speech6")
    fixtures.speech_track(audio, seconds=6.0, seed=5)
    rows = tmp_path / "rows.csv"
    rows.write_text("audio,image,output,set\n"
                    f"lesson.wav,{media['portrait']},lesson.mp4,size=256*256;builtin.crf=0\n")
    stale = avatar("batch", str(rows), "--json")
    row = json.loads(stale.stdout)["rows"][0]
    assert row["status"] == "failed" and "--redo" in row["reason"]  # reported, not skipped
    redo = avatar("batch", str(rows), "--redo", "--json")
    assert json.loads(redo.stdout)["rows"][0]["status"] == "done", redo.stderr
    new = fixtures.video_frame_md5s(out)
    assert len(new) == 150 and new != old


@pytest.mark.parametrize("damage", ["truncated", "hand-edited"])
def test_damaged_manifest_is_a_clear_error(media: dict[str, Path], tmp_path: Path,
                                           damage: str) -> None:
    out = tmp_path / "short.mp4"
    args = ["gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out),
            "--set", "size=256*256", "--keep-parts"]
    assert avatar(*args).returncode == 0
    out.unlink()
    manifest = tmp_path / "short.mp4.parts" / "manifest.json"
    if damage == "truncated":
        manifest.write_text(manifest.read_text()[:100])
    else:
        data = json.loads(manifest.read_text())
        data["parts"][0]["state"] = "finished-ish"
        manifest.write_text(json.dumps(data))
    run = avatar(*args)
    assert run.returncode == 2
    assert "job manifest is damaged" in run.stderr and "--force" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()
    assert avatar(*args, "--force").returncode == 0
