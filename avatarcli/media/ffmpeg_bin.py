"""The one place that runs ffmpeg: locating the binary, running it, reading what it prints.

Every ffmpeg call in avatarcli goes through `run` (or `popen` for streaming), so the binary
can be swapped (`FFMPEG_BINARY`, a user's ffmpeg on PATH, or the one in imageio-ffmpeg) and
failures always carry the command and the tail of ffmpeg's stderr.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

from avatarcli.errors import AvatarError, EnvironmentProblem, ExitStatus

log = logging.getLogger(__name__)

# Keep ffmpeg off the terminal's stdin and quiet except for real problems.
BASE_ARGS = ("-nostdin", "-hide_banner")


class FFmpegError(AvatarError):
    """ffmpeg exited non-zero. `stderr_tail` holds its last lines."""

    exit_code = ExitStatus.ENGINE

    def __init__(self, message: str, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail


# Set by ffmpeg_exe() once it has found a working binary, for the processes this one starts
# (batch processes): {"key": where it was looked for (host, FFMPEG_BINARY, PATH), "exe": the
# binary, "pid": who checked}.
VERIFIED_ENV = "AVATARCLI_FFMPEG_VERIFIED"


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of a working ffmpeg: $FFMPEG_BINARY, else ffmpeg on PATH, else imageio-ffmpeg's.

    A binary that is missing or does not answer `-version` like ffmpeg is a problem of this
    machine (EnvironmentProblem), never blamed on the user's files. A process started by
    one that checked the same lookup (same host, FFMPEG_BINARY and PATH) takes its answer
    instead of running the binary again (a batch process's start is on every job's path).
    """
    key = _lookup_key()
    inherited = _inherited(key)
    if inherited is not None:
        return inherited
    exe = _find()
    os.environ[VERIFIED_ENV] = json.dumps({"key": key, "exe": exe, "pid": os.getpid()})
    return exe


def _lookup_key() -> list[str]:
    # The host too: an environment copied to another machine (a cluster node) names
    # binaries that machine has not been checked for.
    return [socket.gethostname(), os.environ.get("FFMPEG_BINARY", ""),
            os.environ.get("PATH", "")]


def _inherited(key: list[str]) -> str | None:
    """The binary a parent process verified for this same lookup, if it is still there."""
    try:
        record = json.loads(os.environ.get(VERIFIED_ENV, ""))
        exe, pid = str(record["exe"]), int(record["pid"])
        same = record["key"] == key
    except (ValueError, KeyError, TypeError):
        return None
    # This process's own record is no answer: clearing the cache means "look again".
    if not same or pid == os.getpid() or not os.access(exe, os.X_OK):
        return None
    return exe


def _find() -> str:
    env = os.environ.get("FFMPEG_BINARY")
    if env:
        if shutil.which(env) is None:
            raise EnvironmentProblem(f"FFMPEG_BINARY={env}: no such executable")
        return _working(env, f"FFMPEG_BINARY={env}")
    on_path = shutil.which("ffmpeg")
    if on_path:
        return _working(on_path, on_path)
    try:
        import imageio_ffmpeg

        exe = str(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception as exc:  # the package raises RuntimeError or ImportError
        raise EnvironmentProblem(
            "ffmpeg not found: install ffmpeg, set FFMPEG_BINARY, or pip install imageio-ffmpeg"
        ) from exc
    return _working(exe, exe)


def _working(exe: str, label: str) -> str:
    try:
        out = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, timeout=60,
                             stdin=subprocess.DEVNULL, check=False, preexec_fn=die_with_parent)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EnvironmentProblem(f"{label}: cannot run ffmpeg ({exc})") from exc
    if out.returncode != 0 or b"ffmpeg version" not in out.stdout:
        said = tail(out.stderr.decode("utf-8", "replace"), 1) or f"exit {out.returncode}"
        raise EnvironmentProblem(f"{label}: not a working ffmpeg (`-version` gave: {said}); "
                                 f"install ffmpeg or point FFMPEG_BINARY at one")
    return exe


# ffmpeg's words for failures of the machine rather than of the input.
ENVIRONMENT_MARKERS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                       "Cannot allocate memory", "Too many open files", "Permission denied")


def _environment_failure(returncode: int, stderr: str) -> str | None:
    """Why a failed ffmpeg run is the machine's problem (killed, out of memory, disk full)."""
    if returncode < 0:
        return (f"ffmpeg was killed by signal {-returncode} (by the system's out-of-memory "
                f"killer or another process)")
    hit = next((m for m in ENVIRONMENT_MARKERS if m in stderr), None)
    return f"ffmpeg failed: {hit}" if hit else None


def _prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the thread that started it dies, so no ffmpeg
    (or model process) outlives a killed avatarcli. The function was looked up beforehand,
    so the child makes a single system call here."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


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
        timeout=timeout, check=False, preexec_fn=die_with_parent,
    )
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise_for_environment(proc.returncode, stderr, cmd)
    if check and proc.returncode != 0:
        raise FFmpegError(
            f"ffmpeg failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail(stderr)}",
            tail(stderr),
        )
    return stderr


def raise_for_environment(returncode: int, stderr: str, cmd: Sequence[str]) -> None:
    """Raise EnvironmentProblem when a failed ffmpeg run is the machine's fault."""
    why = _environment_failure(returncode, stderr)
    if why is not None:
        paths = [a for a in cmd[1:] if os.sep in a and not a.startswith("-")]
        where = f"{paths[-1]}: " if paths else ""  # our calls give the output last
        raise EnvironmentProblem(f"{where}{why}; a problem of this machine, not of the input "
                                 f"(rerun the same command to resume)")


def popen(args: Sequence[str], *, stdin: int | None = None, stdout: int | None = None,
          stderr: int | None = None) -> subprocess.Popen[bytes]:
    """Start ffmpeg for streaming (a pipe in or out). The caller owns the process."""
    cmd = command(args)
    log.debug("popen: %s", shlex.join(cmd))
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=stdout, stderr=stderr,
        preexec_fn=die_with_parent,
    )


@functools.lru_cache(maxsize=1)
def version() -> str:
    out = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True, check=False,
                         preexec_fn=die_with_parent)
    m = re.search(r"ffmpeg version (\S+)", out.stdout)
    return m.group(1) if m else "unknown"


@functools.lru_cache(maxsize=1)
def encoders() -> frozenset[str]:
    """Encoder names the binary has (`ffmpeg -encoders`, which prints them on stdout)."""
    out = subprocess.run([ffmpeg_exe(), *BASE_ARGS, "-encoders"], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
                         preexec_fn=die_with_parent).stdout
    return frozenset(parse_encoders(out))


def parse_encoders(text: str) -> set[str]:
    """Names from `-encoders` lines such as ` V....D libx264   libx264 H.264 ...`."""
    return {m.group(1) for m in re.finditer(r"^\s*[VAS][A-Z.]{5}\s+(\S+)", text, re.MULTILINE)
            if m.group(1) != "="}
