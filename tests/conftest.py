from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fixtures  # tests/fixtures.py: offline speech and portraits
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated inputs shared by the suite: speech of several lengths, portraits, bad files."""
    d = tmp_path_factory.mktemp("media")
    out = {
        "speech6": fixtures.speech_track(d / "speech6.wav", seconds=6.0, seed=1),
        "speech30": fixtures.speech_track(d / "speech30.wav", seconds=30.0, seed=2),
        "portrait": fixtures.portrait(d / "portrait.png", size=384),
    }
    out.update(fixtures.portrait_variants(d / "portraits"))
    out.update(fixtures.bad_files(d / "bad"))
    return out


@pytest.fixture(autouse=True)
def isolated_presets(tmp_path_factory: pytest.TempPathFactory,
                     monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees (or writes) the developer's own presets and history."""
    monkeypatch.setenv("AVATARCLI_PRESETS_DIR", str(tmp_path_factory.mktemp("no-user-presets")))
    monkeypatch.setenv("AVATARCLI_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    yield


# Built-in engine settings whose output can be compared frame by frame: lossless x264 (crf 0)
# decodes to the same pixels however the frames were split into parts and encoded.
def gone(pid: int, timeout: float = 10, poll: float = 0.1) -> bool:
    """Whether process `pid` exits (or is only a zombie) within `timeout` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(poll)
    return False


def ffmpeg_wrapper(path: Path, pattern: str, action: str) -> Path:
    """An executable at `path` that runs the shell `action` when its arguments match the
    case `pattern` (e.g. "*concat*"), then (unless the action exits) the real ffmpeg."""
    import stat

    from avatarcli.media import ffmpeg_bin

    real = ffmpeg_bin.ffmpeg_exe()
    path.write_text(f"#!/bin/sh\ncase \"$*\" in {pattern}) {action};; esac\n"
                    f"exec '{real}' \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


LOSSLESS = ("--set", "size=256*256", "--set", "builtin.crf=0")


@pytest.fixture(scope="session")
def reference_md5s(media: dict[str, Path],
                   tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[str]]:
    """Per-frame MD5s of a single-batch, uninterrupted built-in render of media[key] with the
    portrait (LOSSLESS settings): what every split, resumed or parallel render must equal."""
    cache: dict[str, list[str]] = {}

    def get(key: str) -> list[str]:
        if key not in cache:
            out = tmp_path_factory.mktemp("reference") / f"{key}.mp4"
            run = subprocess.run(
                [sys.executable, "-m", "avatarcli", "gen", str(media[key]),
                 str(media["portrait"]), "-o", str(out), *LOSSLESS,
                 "--set", "clips_per_batch=10000", "--json"],
                capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            assert run.returncode == 0, run.stderr
            assert json.loads(run.stdout)["batches"] == 1
            cache[key] = fixtures.video_frame_md5s(out)
            assert len(set(cache[key])) > len(cache[key]) // 2  # frames differ: order shows
        return cache[key]

    return get


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    """A local LiveAvatar LoRA file for the stand-in checkout (no weights)."""
    path = tmp_path / "lora" / "liveavatar.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"stand-in weights")
    return path
