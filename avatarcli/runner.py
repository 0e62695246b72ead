"""Runs batches, one fresh OS process each, up to N at a time; the same path for 1 or many.

Each batch process gets its own session (process group) so that stopping it also stops
whatever it started. On the first failure the rest are cancelled and the failure reported.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from avatarcli import procs
from avatarcli.errors import EngineError, EnvironmentProblem, ExitStatus, OutOfMemoryError
from avatarcli.options import WorkerOptions
from avatarcli.resident import ResidentHandle, ResidentPool
from avatarcli.slot import THREADS_VAR, Slot, WorkerTask
from avatarcli.telemetry import Sampler

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 12

TIMEOUT_RETRIES = 1  # a batch that timed out is launched once more before the job fails


class BatchTimeout(EngineError):
    """A batch ran past its time limit and was stopped."""


@dataclass(frozen=True)
class BatchResult:
    index: int
    seconds: float
    returncode: int
    rung: int = 0  # the out-of-memory retry rung that rendered it (0: the preset itself)
    telemetry: dict[str, Any] = field(default_factory=dict)  # Telemetry.to_dict(), frames unset
    worker: dict[str, Any] = field(default_factory=dict)  # resident worker: id, pid, load_s


@dataclass(frozen=True)
class Resident:
    """How a job's batches use resident workers: the pool, the model key at each retry rung
    (a rung that changes the model needs another worker) and the recycling bounds."""

    pool: ResidentPool
    keys: list[str]
    limits: WorkerOptions


def _worker_facts(handle: BatchHandle) -> dict[str, Any]:
    if not isinstance(handle, ResidentHandle):
        return {}
    facts = {"id": handle.worker.record.id, "pid": handle.worker.proc.pid,
             "batch_no": len(handle.worker.record.batches)}
    if handle.report:
        facts.update({k: handle.report[k] for k in ("load_s", "rss_mb", "model_pid")
                      if k in handle.report})
    return facts


@dataclass
class Hooks:
    """Callbacks from the runner to its caller; called from worker threads, serialised by a lock."""

    started: Callable[[int, int], None] = lambda index, pid: None
    progress: Callable[[int, int], None] = lambda index, frames_delta: None
    finished: Callable[[BatchResult], None] = lambda result: None
    failed: Callable[[int, str, str, dict[str, Any]], None] = (
        lambda index, kind, message, telemetry: None)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class BatchHandle(Protocol):
    """One running batch process, wherever it runs."""

    pid: int | None  # for the manifest and for humans; None where there is no local pid

    def lines(self) -> Iterator[str]:
        """The batch process's stdout lines (`progress N`), until it ends."""
        ...

    def wait(self) -> int:
        """Its exit code (negative: killed by that signal)."""
        ...

    def stop(self) -> None:
        """Stop it and everything it started; harmless when it has ended."""
        ...

    def telemetry(self) -> dict[str, Any]:
        """Telemetry.to_dict() of the batch (frames unset); call after stop()."""
        ...


class Executor(Protocol):
    """Where batch processes run. Nothing above the runner knows which one it is."""

    def slots(self, jobs: int) -> list[dict[str, str]] | None:
        """The environments of concurrent batches (as engines describe slots: see
        Slot.from_env), or None to let the engine decide (GPUs)."""
        ...

    def start(self, task: WorkerTask, log_path: Path) -> BatchHandle:
        """Start a batch process for `task`, its stderr to `log_path`."""
        ...

    def for_row(self, preset: Any) -> Executor:
        """This executor for one row of a manifest, asking for that row's preset's resources."""
        ...


class LocalHandle:
    def __init__(self, proc: subprocess.Popen[bytes], sampler: Sampler) -> None:
        self.proc = proc
        self.pid: int | None = proc.pid
        self._sampler = sampler
        self._telemetry: dict[str, Any] = {}

    def lines(self) -> Iterator[str]:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            yield raw.decode("utf-8", "replace").strip()

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self) -> None:
        procs.kill_group(self.proc)
        if not self._telemetry:
            self._telemetry = self._sampler.stop().to_dict()

    def telemetry(self) -> dict[str, Any]:
        return self._telemetry


class LocalExecutor:
    """Batch processes on this machine, each in its own session (process group)."""

    def slots(self, jobs: int) -> list[dict[str, str]] | None:
        return None  # this machine's GPUs: the engine knows how to share them

    def for_row(self, preset: Any) -> LocalExecutor:
        return self  # this machine's GPUs are shared out by the engine, row by row

    def start(self, task: WorkerTask, log_path: Path) -> LocalHandle:
        proc = procs.spawn(task.command(), log_path)
        # Peak RSS of the whole tree and GPU memory of its devices, sampled while it runs.
        return LocalHandle(proc, Sampler(proc.pid, task.slot.gpu_ids).start())


_ACTIVE: set[Runner] = set()
_ACTIVE_LOCK = threading.Lock()


def cancel_all() -> None:
    """Stop every runner of this process (a signal arrived while rows render in threads)."""
    with _ACTIVE_LOCK:
        runners = list(_ACTIVE)
    for runner in runners:
        runner.cancel()


class Runner:
    """Runs `indices` of a job; `slots` (environment dicts, as engines and executors give
    them) says where each concurrent batch process runs."""

    def __init__(self, job_dir: Path, log_path: Callable[[int], Path], *,
                 slots: Sequence[Mapping[str, str]], cooldown_s: float = 0.0,
                 oom_rungs: int = 0, hooks: Hooks | None = None,
                 executor: Executor | None = None, resident: Resident | None = None,
                 timeout_s: Callable[[int], float] | None = None) -> None:
        assert slots, "at least one slot"
        self.timeout_s = timeout_s  # index -> seconds a batch may run (None: no limit)
        self.job_dir = job_dir
        self.executor: Executor = executor or LocalExecutor()
        self.oom_rungs = oom_rungs
        self.log_path = log_path
        threads = None
        if len(slots) > 1:
            # Share the cores between concurrent batches instead of oversubscribing them.
            threads = int(os.environ.get(THREADS_VAR) or
                          max(1, (os.cpu_count() or 1) // len(slots)))
        self.slots = [Slot.from_env(s, threads=threads) for s in slots]
        self.cooldown_s = cooldown_s
        self.hooks = hooks or Hooks()
        self.resident = resident
        self._cancel = threading.Event()
        self._procs: dict[int, BatchHandle] = {}
        self._procs_lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._last_launch = 0.0

    def run(self, indices: Sequence[int]) -> None:
        """Render every index; raise EngineError/OutOfMemoryError on the first failure."""
        free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        for slot in self.slots:
            free.put(slot)
        with _ACTIVE_LOCK:
            _ACTIVE.add(self)
        pool = ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="batch")
        futures = [pool.submit(self._run_one, i, free) for i in indices]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            for fut in futures:
                if fut.done() and fut.exception() is not None:
                    self.cancel()
                    wait(futures)
                    raise fut.exception()  # type: ignore[misc]
        except BaseException:
            self.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self)

    def cancel(self) -> None:
        """Stop launching, and stop every running batch process group."""
        self._cancel.set()
        with self._procs_lock:
            handles = list(self._procs.values())
        for handle in handles:
            handle.stop()

    def _wait_cooldown(self) -> None:
        with self._launch_lock:
            if self._last_launch and self.cooldown_s > 0:
                remaining = self._last_launch + self.cooldown_s - time.monotonic()
                if remaining > 0:
                    self._cancel.wait(remaining)
            self._last_launch = time.monotonic()

    def _run_one(self, index: int, free: queue.SimpleQueue[Slot]) -> None:
        if self._cancel.is_set():
            return
        slot = free.get()
        rung = timeouts = 0
        try:
            while True:
                self._wait_cooldown()
                if self._cancel.is_set():
                    return
                try:
                    self._launch(index, slot, rung)
                    return
                except OutOfMemoryError:
                    if rung == self.oom_rungs:
                        raise
                    rung += 1
                    log.warning("batch %d ran out of memory; retrying it with rung %d of the "
                                "preset's oom_retry ladder", index, rung)
                except BatchTimeout:
                    timeouts += 1
                    if timeouts > TIMEOUT_RETRIES:
                        raise
                    log.warning("batch %d timed out and was stopped; retrying it once", index)
        finally:
            free.put(slot)

    def _launch(self, index: int, slot: Slot, rung: int = 0, retried: bool = False) -> None:
        task = WorkerTask(self.job_dir, index, rung, slot)
        log_path = self.log_path(index)
        started = time.monotonic()
        handle: BatchHandle
        if self.resident is not None:
            r = self.resident
            handle = r.pool.start(key=r.keys[rung], task=task, limits=r.limits,
                                  log_path=log_path)
        else:
            handle = self.executor.start(task, log_path)
        with self._procs_lock:
            self._procs[index] = handle
        with self.hooks.lock:
            self.hooks.started(index, handle.pid or 0)
        limit = self.timeout_s(index) if self.timeout_s else None
        expired = threading.Event()

        def expire() -> None:  # stop the batch's whole process group; the pump then ends
            expired.set()
            handle.stop()

        timer = threading.Timer(limit, expire) if limit else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            self._pump(index, handle)
            rc = handle.wait()
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()  # a stop() it began has finished before ours
            handle.stop()
            with self._procs_lock:
                self._procs.pop(index, None)
        telemetry = handle.telemetry()
        seconds = time.monotonic() - started
        worker = _worker_facts(handle)
        if rc == ExitStatus.OK:
            with self.hooks.lock:
                self.hooks.finished(BatchResult(index, seconds, rc, rung, telemetry, worker))
            return
        if self._cancel.is_set():
            return  # stopped on purpose; the caller reports why
        if self.resident is not None and rc < 0 and not retried and not expired.is_set():
            # The resident worker was killed (not a model error): this batch alone goes to a
            # fresh worker, once.
            log.warning("batch %d: its resident worker was killed by signal %d; rendering "
                        "it again in a new worker", index, -rc)
            self._launch(index, slot, rung, retried=True)
            return
        kind = ("oom" if rc == ExitStatus.OUT_OF_MEMORY else
                "environment" if rc == ExitStatus.ENVIRONMENT else "crash")
        reason = f"exit code {rc}" if rc > 0 else f"killed by signal {-rc}"
        if expired.is_set():
            kind, reason = "timeout", (f"timed out after {limit:g} s (batch_timeout_s) and was "
                                       f"stopped")
        if kind == "oom":
            reason = (f"out of memory at rung {rung} of {self.oom_rungs}" if self.oom_rungs
                      else "out of memory")
        lines = _tail(log_path).splitlines()
        tail = "\n".join(f"  | {line}" for line in lines)
        message = f"batch {index} failed ({reason}); last lines of {log_path}:\n{tail}"
        if kind == "oom":  # the memory facts the failure reported, on the first line
            seen = [ln for ln in lines if "out of memory" in ln.lower() and "GiB" in ln]
            if seen:
                message = (f"batch {index} failed ({reason}): {seen[-1].strip()}; last lines "
                           f"of {log_path}:\n{tail}")
        with self.hooks.lock:
            self.hooks.failed(index, kind, message, telemetry)
        if kind == "environment":  # the batch's log says what: a full disk, a killed ffmpeg
            said = re.sub(r"^[\d-]+ [\d:,]+ \w+ [\w.]+: ", "", lines[-1].strip()) if lines else ""
            raise EnvironmentProblem(f"batch {index}: {said}" if said else
                                     f"batch {index} stopped by a problem of this machine; "
                                     f"its log: {log_path}")
        raise {"oom": OutOfMemoryError, "timeout": BatchTimeout}.get(kind, EngineError)(message)

    def _pump(self, index: int, handle: BatchHandle) -> None:
        """Read `progress N` lines from the batch process and report the deltas."""
        last = 0
        for line in handle.lines():
            if line.startswith("progress "):
                try:
                    done = int(line.split()[1])
                except (IndexError, ValueError):
                    continue
                if done > last:
                    with self.hooks.lock:
                        self.hooks.progress(index, done - last)
                    last = done
