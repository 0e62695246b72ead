"""Real runs of `python -m avatarcli gen`: separate processes, real ffmpeg, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import fixtures
import numpy as np
import pytest
from conftest import LOSSLESS

from avatarcli.media import ffmpeg_bin as ff
from avatarcli.media import streams as m

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


def test_gen_renders_a_verified_video_in_several_batches(
        media: dict[str, Path], tmp_path: Path,
        reference_md5s: Callable[[str], list[str]]) -> None:
    out = tmp_path / "talk.mp4"
    run = avatar("gen", str(media["speech30"]), str(media["portrait"]), "-o", str(out),
                 "--set", "clips_per_batch=4", *LOSSLESS, "--jobs", "2", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["frames"] == 750 and summary["batches"] == 4
    assert summary["batches_rendered"] == [0, 1, 2, 3]
    check_output(out, frames=750, seconds=30.0, size=(256, 256))
    # Frame for frame what one uninterrupted batch shows: parts in order, none shifted.
    assert fixtures.video_frame_md5s(out) == reference_md5s("speech30")
    assert not (tmp_path / "talk.mp4.parts").exists()  # parts removed on success
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4"]

    again = avatar("gen", str(media["speech30"]), str(media["portrait"]), "-o", str(out))
    assert again.returncode == 2 and "output exists" in again.stderr


def test_damaged_part_is_rendered_again(media: dict[str, Path], tmp_path: Path,
                                       reference_md5s: Callable[[str], list[str]]) -> None:
    out = tmp_path / "short.mp4"
    args = ["gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out),
            "--set", "clips_per_batch=1", *LOSSLESS, "--keep-parts", "--json"]
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
    assert fixtures.video_frame_md5s(out) == reference_md5s("speech6")


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


def test_mouth_and_muxed_sound_are_in_sync_with_the_recording(media: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """With blinks and head motion off only the mouth moves: how far each frame is from the
    first (silent, closed) one must follow the recording's loudness at the same frame. The
    best-matching shift of one against the other is 0 (or the mouth one frame behind)."""
    x, rate = fixtures.read_wav(media["speech6"])
    audio = fixtures.write_wav(tmp_path / "lead.wav", np.concatenate([np.zeros(rate, np.int16),
                                                                      x]), rate)
    out = tmp_path / "lips.mp4"
    run = avatar("gen", str(audio), str(media["portrait"]), "-o", str(out), *LOSSLESS,
                 "--set", "clips_per_batch=1", "--set", "builtin.head_motion=0",
                 "--set", "builtin.blink_rate_per_min=0")
    assert run.returncode == 0, run.stderr
    proc = ff.popen(["-v", "error", "-i", str(out), "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                    stdout=subprocess.PIPE)
    assert proc.stdout is not None
    frames = np.frombuffer(proc.stdout.read(), np.uint8).reshape(-1, 256, 256).astype(float)
    assert proc.wait() == 0
    n = len(frames)
    assert n == 175
    motion = np.abs(frames - frames[0]).mean(axis=(1, 2))
    samples = np.concatenate([np.zeros(rate), x.astype(float) / 32768])
    loud = frame_loudness(samples, rate, n)

    def z(v: np.ndarray) -> np.ndarray:
        return (v - v.mean()) / v.std()

    def best_lag(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
        """The shift of `a` against `b` that matches best (a[k + lag] with b[k]), and how well."""
        a, b = z(a), z(b)

        def match(lag: int) -> float:
            return float(np.mean(a[max(0, lag):n + min(0, lag)] * b[max(0, -lag):n - max(0, lag)]))

        lag = max(range(-25, 26), key=match)
        return lag, match(lag)

    lag, how_well = best_lag(motion, loud)
    assert lag in (0, 1), f"the mouth is {lag} frames off the sound"
    assert how_well > 0.5  # and it does follow it
    # The muxed sound itself sits where the recording has it: its loudness, frame by frame.
    dec = ff.popen(["-v", "error", "-i", str(out), "-map", "0:a", "-ac", "1", "-ar", str(rate),
                    "-f", "s16le", "-"], stdout=subprocess.PIPE)
    assert dec.stdout is not None
    muxed = np.frombuffer(dec.stdout.read(), "<i2").astype(float) / 32768
    assert dec.wait() == 0
    lag, how_well = best_lag(frame_loudness(muxed, rate, n), loud)
    assert lag == 0 and how_well > 0.9, f"the output's sound is {lag} frames off the recording"


def frame_loudness(samples: np.ndarray, rate: int, n: int) -> np.ndarray:
    """dBFS of each of `n` frames' stretch of audio at 25 fps, floored at -60."""
    return np.array([20 * np.log10(max(float(np.sqrt(np.mean(
        samples[round(k * rate / 25):round((k + 1) * rate / 25)] ** 2))), 1e-3))
        for k in range(n)])
