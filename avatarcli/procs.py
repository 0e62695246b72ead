"""The one place that starts and stops processes.

Batch processes (`spawn`): each in its own session (process group), so that `kill_group`
stops it and everything it started; their stderr goes to the batch's log. Model processes
(torchrun, a command template's program: `run_logged`, `start_pipe`): their output goes to
the batch's log (the batch process's stderr); a tail is kept to recognise out-of-memory
failures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED",
               "CUDA error: out of memory")
TAIL_LINES = 200


@dataclass(frozen=True)
class Outcome:
    returncode: int
    tail: str

    @property
    def out_of_memory(self) -> bool:
        return any(marker in self.tail for marker in OOM_MARKERS)

    @property
    def oom_line(self) -> str:
        """The last line that reports the out-of-memory failure (what was asked, what was free)."""
        lines = [ln.strip() for ln in self.tail.splitlines()
                 if any(marker in ln for marker in OOM_MARKERS)]
        return max(lines[-3:], key=len, default="")


def executable(name: str, cwd: str | Path | None = None) -> bool:
    """Whether `name` can be run: on PATH, or a path (relative to `cwd`) to an executable."""
    if os.sep in name or "/" in name:
        path = Path(name).expanduser()
        if not path.is_absolute() and cwd is not None:
            path = Path(cwd).expanduser() / path
        return path.is_file() and os.access(path, os.X_OK)
    return shutil.which(name) is not None


def run_logged(cmd: list[str], *, cwd: Path | None, env: dict[str, str]) -> Outcome:
    """Run `cmd` (no shell), copying its output to our stderr; return its exit code and tail."""
    log.debug("run: %s", shlex.join(cmd))
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        return Outcome(127, f"cannot start {cmd[0]}: {exc}")
    assert proc.stdout is not None
    tail: list[str] = []
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        sys.stderr.write(line)
        tail.append(line)
        if len(tail) > TAIL_LINES:
            del tail[0]
    sys.stderr.flush()
    return Outcome(proc.wait(), "".join(tail))


def start_pipe(cmd: list[str], *, cwd: Path | None, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a long-lived model process we talk to over its stdin/stdout (stderr piped too).

    It stays in our process group, so stopping a batch process's group stops it as well.
    """
    log.debug("start: %s", shlex.join(cmd))
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        from avatarcli.errors import EngineError

        raise EngineError(f"cannot start {cmd[0]}: {exc}") from exc


def spawn(cmd: list[str], log_path: Path, *, header: str | None = None,
          stdin: bool = False) -> subprocess.Popen[bytes]:
    """Start `cmd` in a session (process group) of its own, its stderr appended to `log_path`
    after a `# TIME HEADER` line (by default the command), its stdout piped to us; its stdin
    piped too when `stdin`, else /dev/null. It inherits our environment: what it needs to know
    is in its arguments (a batch process: avatarcli.slot.WorkerTask)."""
    with open(log_path, "ab") as logf:
        logf.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {header or shlex.join(cmd)}\n"
                   .encode())
        logf.flush()
        return subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=logf, start_new_session=True)


def kill_group(proc: subprocess.Popen[bytes], *, grace_s: float = 5.0) -> None:
    """Stop a process `spawn` started and everything it started (its whole process group):
    SIGTERM, then SIGKILL after `grace_s`. Harmless when it has ended."""
    if proc.poll() is None:
        _escalate(proc, lambda sig: os.killpg(proc.pid, sig), grace_s=grace_s,
                  wait_first=False)


def kill_leftovers(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM what an ended process `spawn` started left behind in its group (a model
    process); no wait."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)


def stop(proc: subprocess.Popen[bytes], *, grace_s: float = 5.0) -> None:
    """Wait up to `grace_s` for `proc` to end, then SIGTERM, then SIGKILL."""
    _escalate(proc, proc.send_signal, grace_s=grace_s, wait_first=True)


def _escalate(proc: subprocess.Popen[bytes], send: Callable[[int], None], *, grace_s: float,
              wait_first: bool) -> None:
    """(Wait, then) SIGTERM, then SIGKILL through `send`, `grace_s` apart, until `proc` ends.
    A process already gone only needs reaping; one we may not signal is left alone."""
    for sig in ((None,) if wait_first else ()) + (signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                send(sig)
            except ProcessLookupError:
                pass  # it ended: the wait below returns at once
            except PermissionError:
                return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def free_port() -> int:
    """A TCP port that is free on this machine now, for a torchrun rendezvous.

    Asked per launch (never a fixed base port): two `avatar` runs on one host, or a cron job
    beside a manual run, would otherwise pick the same port and one launch would fail.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port: int = sock.getsockname()[1]
        return port
