"""The one place that runs ffmpeg: locating the binary, running it, reading what it prints.

Every ffmpeg call in avatarcli goes through `run` (or `popen` for streaming), so the binary
can be swapped (`FFMPEG_BINARY`, a user's ffmpeg on PATH, or the one in imageio-ffmpeg) and
failures always carry the command and the tail of ffmpeg's stderr.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence

from avatarcli.errors import AvatarError, InputError

log = logging.getLogger(__name__)

# Keep ffmpeg off the terminal's stdin and quiet except for real problems.
BASE_ARGS = ("-nostdin", "-hide_banner")


class FFmpegError(AvatarError):
    """ffmpeg exited non-zero. `stderr_tail` holds its last lines."""

    exit_code = 3

    def __init__(self, message: str, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: $FFMPEG_BINARY, else ffmpeg on PATH, else imageio-ffmpeg's."""
    env = os.environ.get("FFMPEG_BINARY")
    if env:
        if shutil.which(env) is None:
            raise InputError(f"FFMPEG_BINARY={env}: no such executable")
        return env
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception as exc:  # the package raises RuntimeError or ImportError
        raise InputError(
            "ffmpeg not found: install ffmpeg, set FFMPEG_BINARY, or pip install imageio-ffmpeg"
        ) from exc


def command(args: Sequence[str]) -> list[str]:
    """The full argument list for an ffmpeg call."""
    return [ffmpeg_exe(), *BASE_ARGS, *args]


def tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(args: Sequence[str], *, check: bool = True, timeout: float | None = None) -> str:
    """Run ffmpeg with `args` (without the binary) and return its stderr as text."""
    cmd = command(args)
    log.debug("run: %s", shlex.join(cmd))
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        timeout=timeout, check=False,
    )
    stderr = proc.stderr.decode("utf-8", "replace")
    if check and proc.returncode != 0:
        raise FFmpegError(
            f"ffmpeg failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail(stderr)}",
            tail(stderr),
        )
    return stderr


def popen(args: Sequence[str], *, stdin: int | None = None, stdout: int | None = None,
          stderr: int | None = None) -> subprocess.Popen[bytes]:
    """Start ffmpeg for streaming (a pipe in or out). The caller owns the process."""
    cmd = command(args)
    log.debug("popen: %s", shlex.join(cmd))
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=stdout, stderr=stderr
    )


@functools.lru_cache(maxsize=1)
def version() -> str:
    out = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True, check=False)
    m = re.search(r"ffmpeg version (\S+)", out.stdout)
    return m.group(1) if m else "unknown"


@functools.lru_cache(maxsize=1)
def encoders() -> frozenset[str]:
    """Encoder names the binary has (`ffmpeg -encoders`, which prints them on stdout)."""
    out = subprocess.run([ffmpeg_exe(), *BASE_ARGS, "-encoders"], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL, check=False).stdout
    return frozenset(parse_encoders(out))


def parse_encoders(text: str) -> set[str]:
    """Names from `-encoders` lines such as ` V....D libx264   libx264 H.264 ...`."""
    return {m.group(1) for m in re.finditer(r"^\s*[VAS][A-Z.]{5}\s+(\S+)", text, re.MULTILINE)
            if m.group(1) != "="}
