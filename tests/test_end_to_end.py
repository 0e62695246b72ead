"""Real runs of `python -m avatarcli gen`: separate processes, real ffmpeg, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avatarcli import media as m

pytestmark = pytest.mark.slow


def avatar(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "avatarcli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def check_output(path: Path, *, frames: int, seconds: float, size: tuple[int, int]) -> None:
    info = m.probe(path)
    video, audio = info.first("video"), info.first("audio")
    assert video is not None and audio is not None
    assert (video.width, video.height) == size and video.codec == "h264"
    assert audio.codec == "aac"
    assert m.video_frames(path) == frames
    assert abs(m.audio_seconds(path) - seconds) <= 1 / 25


def test_gen_renders_a_verified_video_in_several_batches(media: dict[str, Path],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    run = avatar("gen", str(media["speech30"]), str(media["portrait"]), "-o", str(out),
                 "--set", "clips_per_batch=4", "--set", "size=256*256", "--jobs", "2", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["frames"] == 750 and summary["batches"] == 4
    assert summary["batches_rendered"] == [0, 1, 2, 3]
    check_output(out, frames=750, seconds=30.0, size=(256, 256))
    assert not (tmp_path / "talk.mp4.parts").exists()  # parts removed on success
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4"]

    again = avatar("gen", str(media["speech30"]), str(media["portrait"]), "-o", str(out))
    assert again.returncode == 2 and "output exists" in again.stderr


def _wait_for_running_batch(manifest: Path, proc: subprocess.Popen[str],
                            timeout: float = 120) -> int:
    """The pid of a batch process that is running after at least one part is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "avatar exited before a batch could be killed"
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


def test_killed_batch_is_the_only_one_rendered_again(media: dict[str, Path],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "resume.mp4"
    args = ["gen", str(media["speech30"]), str(media["portrait"]), "-o", str(out),
            "--set", "clips_per_batch=4", "--set", "size=256*256", "--keep-parts"]
    proc = subprocess.Popen([sys.executable, "-m", "avatarcli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    manifest = tmp_path / "resume.mp4.parts" / "manifest.json"
    pid = _wait_for_running_batch(manifest, proc)
    os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert "killed by signal 9" in stderr and "batch-" in stderr
    assert not out.exists()

    state = {p["index"]: p["state"] for p in json.loads(manifest.read_text())["parts"]}
    done_before = sorted(i for i, s in state.items() if s == "done")
    assert done_before and "failed" in state.values()

    rerun = avatar(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["batches_reused"] == done_before
    assert sorted(summary["batches_rendered"]) == sorted(set(range(4)) - set(done_before))
    check_output(out, frames=750, seconds=30.0, size=(256, 256))


def test_damaged_part_is_rendered_again(media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "short.mp4"
    args = ["gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out),
            "--set", "clips_per_batch=1", "--set", "size=256*256", "--keep-parts", "--json"]
    first = avatar(*args)
    assert first.returncode == 0, first.stderr
    parts = tmp_path / "short.mp4.parts" / "parts"
    victim = parts / "part-0001.mp4"
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    out.unlink()
    second = avatar(*args)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["batches_rendered"] == [1]
    assert "damaged or missing" in second.stderr
    check_output(out, frames=150, seconds=6.0, size=(256, 256))


def test_changed_settings_are_not_mixed_into_an_old_job(media: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "mix.mp4"
    base = ["gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out), "--keep-parts",
            "--set", "size=256*256"]
    assert avatar(*base).returncode == 0
    out.unlink()
    changed = avatar(*base, "--set", "seed=1")
    assert changed.returncode == 2 and "different inputs or settings" in changed.stderr
    assert not out.exists()
    forced = avatar(*base, "--set", "seed=1", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["batches_reused"] == []
