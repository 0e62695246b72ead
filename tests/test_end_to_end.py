"""Real runs of `python -m avatarcli gen`: separate processes, real ffmpeg, real files."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_output_is_a_normal_file_not_a_private_temp(media: dict[str, Path],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "perm.mp4"
    run = avatar("gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out),
                 "--set", "size=256*256", "-q")
    assert run.returncode == 0, run.stderr
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
