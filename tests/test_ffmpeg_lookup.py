"""ffmpeg is checked once per job: batch processes take the parent's verified binary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ffmpeg_wrapper

from avatarcli.errors import EnvironmentProblem
from avatarcli.media import ffmpeg_bin as ffmpeg


@pytest.fixture
def counting(tmp_path: Path) -> tuple[Path, Path]:
    """An ffmpeg that notes each `-version` run in a file, then is the real one."""
    log = tmp_path / "versions.log"
    path = ffmpeg_wrapper(tmp_path / "counting-ffmpeg", "*-version*", f"echo $$ >> '{log}'")
    return path, log


@pytest.fixture
def fresh_lookup(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ffmpeg.VERIFIED_ENV, raising=False)
    ffmpeg.ffmpeg_exe.cache_clear()
    yield
    ffmpeg.ffmpeg_exe.cache_clear()


def runs(log: Path) -> int:
    return len(log.read_text().split()) if log.is_file() else 0


def test_a_job_checks_ffmpeg_once(media: dict[str, Path], tmp_path: Path,
                                  counting: tuple[Path, Path], fresh_lookup: None) -> None:
    exe, log = counting
    out = tmp_path / "talk.mp4"
    env = {k: v for k, v in os.environ.items() if k != ffmpeg.VERIFIED_ENV}
    run = subprocess.run([sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]),
                          str(media["portrait"]), "-o", str(out), "--set", "size=128*128",
                          "--json"], env={**env, "FFMPEG_BINARY": str(exe)},
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["batches"] >= 1
    assert runs(log) == 1  # the parent's check; the batch process took its answer


def test_another_lookup_or_our_own_record_is_checked_again(
        counting: tuple[Path, Path], fresh_lookup: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    exe, log = counting
    monkeypatch.setenv("FFMPEG_BINARY", str(exe))
    assert ffmpeg.ffmpeg_exe() == str(exe) and runs(log) == 1
    record = json.loads(os.environ[ffmpeg.VERIFIED_ENV])
    assert record["exe"] == str(exe) and record["pid"] == os.getpid()
    ffmpeg.ffmpeg_exe.cache_clear()  # this process's own record: looked up again
    assert ffmpeg.ffmpeg_exe() == str(exe) and runs(log) == 2
    # A parent's record (another pid) for the same lookup is taken as it is...
    monkeypatch.setenv(ffmpeg.VERIFIED_ENV, json.dumps({**record, "pid": os.getpid() + 1}))
    ffmpeg.ffmpeg_exe.cache_clear()
    assert ffmpeg.ffmpeg_exe() == str(exe) and runs(log) == 2
    # ...but not one made on another host (an environment copied to a cluster node)...
    monkeypatch.setenv(ffmpeg.VERIFIED_ENV, json.dumps(
        {**record, "pid": os.getpid() + 1, "key": ["elsewhere", *record["key"][1:]]}))
    ffmpeg.ffmpeg_exe.cache_clear()
    assert ffmpeg.ffmpeg_exe() == str(exe) and runs(log) == 3
    # ...nor for another FFMPEG_BINARY: that one is checked (and found broken).
    monkeypatch.setenv("FFMPEG_BINARY", "/bin/false")
    ffmpeg.ffmpeg_exe.cache_clear()
    with pytest.raises(EnvironmentProblem, match="not a working ffmpeg"):
        ffmpeg.ffmpeg_exe()
