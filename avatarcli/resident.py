"""Resident workers: batch processes that keep a model loaded across batches.

Processes exist here to stop memory building up; they do not have to die after every batch
to do that. A resident worker (`python -m avatarcli.worker --resident`) takes one batch at a
time over a pipe and reports its memory after each; the pool replaces it when its host RSS
grows past a bound over its level after the first batch, when its reserved GPU memory grows
past a bound, after `max_batches`, after any failure, and when it sits idle. Workers are keyed
by the model they hold (the engine's model_key) and the slot (GPUs) they run on, so batches
of one job, and manifest rows whose settings load the same model, share one load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avatarcli import procs
from avatarcli.options import WorkerOptions
from avatarcli.slot import WORKER, Slot, WorkerTask
from avatarcli.telemetry import Sampler

log = logging.getLogger(__name__)


@dataclass
class WorkerRecord:
    """One resident worker's life, for the manifest and the summary."""

    id: int
    pid: int
    model_pid: int | None = None
    load_s: float | None = None  # loading the model, paid by its first batch
    render_s: float = 0.0  # batches' own time, load excluded
    batches: list[str] = field(default_factory=list)  # "JOB_DIR#INDEX", in order
    failed: list[str] = field(default_factory=list)  # the batch it failed or died on
    rss_first_mb: float | None = None  # after its first batch: the watermark's base
    rss_last_mb: float | None = None
    gpu_reserved_first_gb: float | None = None
    gpu_reserved_last_gb: float | None = None
    ended: str | None = None  # why it was stopped (None: still running)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResidentWorker:
    """One `python -m avatarcli.worker --resident` process in its own session."""

    def __init__(self, wid: int, key: str, slot_key: Slot, limits: WorkerOptions,
                 log_path: Path) -> None:
        self.key, self.slot_key, self.limits = key, slot_key, limits
        cmd = [*WORKER, "--resident"]  # its tasks, slot included, come over stdin
        self.proc = procs.spawn(cmd, log_path, header=f"resident worker {wid} starts",
                                stdin=True)
        self.record = WorkerRecord(id=wid, pid=self.proc.pid)
        self.idle_timer: threading.Timer | None = None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, task: WorkerTask, log_path: Path) -> None:
        assert self.proc.stdin is not None
        spec = {**task.to_dict(), "log": str(log_path)}
        self.proc.stdin.write((json.dumps(spec) + "\n").encode())
        self.proc.stdin.flush()

    def read_line(self) -> str | None:
        assert self.proc.stdout is not None
        raw = self.proc.stdout.readline()
        return raw.decode("utf-8", "replace").strip() if raw else None

    def note(self, report: dict[str, Any], batch: str) -> None:
        """Record a finished batch's report (memory, load time)."""
        r = self.record
        r.batches.append(batch)
        if report.get("load_s") is not None:
            r.load_s = float(report["load_s"])
        if report.get("model_pid") is not None:
            r.model_pid = int(report["model_pid"])
        r.render_s += float(report.get("seconds") or 0.0) - float(report.get("load_s") or 0.0)
        rss = report.get("rss_mb")
        reserved = (report.get("gpu") or {}).get("reserved_gb")
        if r.rss_first_mb is None:
            r.rss_first_mb = rss
            r.gpu_reserved_first_gb = reserved
        r.rss_last_mb, r.gpu_reserved_last_gb = rss, reserved

    def retire_reason(self) -> str | None:
        """Why this worker must be replaced now (after a successful batch), or None."""
        r, lim = self.record, self.limits
        if len(r.batches) >= lim.max_batches:
            return f"max_batches ({lim.max_batches})"
        if r.rss_first_mb is not None and r.rss_last_mb is not None and \
                r.rss_last_mb - r.rss_first_mb > lim.rss_growth_mb:
            return (f"host RSS grew {r.rss_last_mb - r.rss_first_mb:.0f} MiB over its first "
                    f"batch (bound {lim.rss_growth_mb:g})")
        if r.gpu_reserved_first_gb is not None and r.gpu_reserved_last_gb is not None and \
                r.gpu_reserved_last_gb - r.gpu_reserved_first_gb > lim.gpu_growth_gb:
            return (f"reserved GPU memory grew {r.gpu_reserved_last_gb - r.gpu_reserved_first_gb:.2f}"
                    f" GiB (bound {lim.gpu_growth_gb:g})")
        return None

    def stop(self, reason: str, *, graceful: bool = True, grace_s: float = 10.0) -> None:
        """End it (and its model process: same session) and record why. Graceful: let it
        close its model; otherwise (mid-batch, a signal) its whole session is killed now."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.record.ended is None:
            self.record.ended = reason
        if self.proc.poll() is None and graceful:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # end of tasks: it closes its model and exits
                self.proc.wait(timeout=grace_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            procs.kill_group(self.proc)
        else:  # whatever it started and left behind (its model process) goes too
            procs.kill_leftovers(self.proc)


class ResidentHandle:
    """One batch running in a resident worker (the runner's BatchHandle)."""

    def __init__(self, pool: ResidentPool, worker: ResidentWorker, batch: str,
                 gpu_ids: list[str]) -> None:
        self.pool, self.worker, self.batch = pool, worker, batch
        self.pid: int | None = worker.proc.pid
        self.report: dict[str, Any] | None = None
        self._sampler = Sampler(worker.proc.pid, gpu_ids).start()
        self._telemetry: dict[str, Any] = {}
        self._ended = False

    def lines(self) -> Iterator[str]:
        while True:
            line = self.worker.read_line()
            if line is None:
                return  # the worker died: wait() says how
            if line.startswith("done "):
                self.report = json.loads(line[5:])
                return
            yield line

    def wait(self) -> int:
        if self.report is not None:
            return 0
        return self.worker.proc.wait()

    def stop(self) -> None:
        """End this batch: a finished one leaves the worker to the pool; an unfinished one
        (cancelled, failed, died) takes the worker down with it."""
        if not self._telemetry:
            self._telemetry = self._sampler.stop().to_dict()
        if self._ended:
            return
        self._ended = True
        self.pool.finished(self)

    def telemetry(self) -> dict[str, Any]:
        return self._telemetry


class ResidentPool:
    """Resident workers by (model key, slot); one pool may serve many jobs (manifest rows)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, Slot], list[ResidentWorker]] = {}
        self._all: list[ResidentWorker] = []
        self._closed = False

    def start(self, *, key: str, task: WorkerTask, limits: WorkerOptions,
              log_path: Path) -> ResidentHandle:
        """Send one batch to a worker for `key` on the task's slot, its log to `log_path`."""
        # A worker serves one slot (its GPUs, its port); the threads a batch may use are
        # set per batch, so they do not split workers.
        slot_key = dataclasses.replace(task.slot, threads=None)
        with self._lock:
            worker = None
            idle = self._idle.get((key, slot_key), [])
            while idle and worker is None:
                candidate = idle.pop()
                if candidate.idle_timer is not None:
                    candidate.idle_timer.cancel()
                if candidate.alive:
                    worker = candidate
                else:
                    candidate.record.ended = candidate.record.ended or "exited while idle"
            if worker is None:
                worker = ResidentWorker(len(self._all) + 1, key, slot_key, limits, log_path)
                self._all.append(worker)
                log.info("resident worker %d (pid %d) starts for %s", worker.record.id,
                         worker.proc.pid, log_path.name)
        worker.limits = limits
        handle = ResidentHandle(self, worker, task.name, task.slot.gpu_ids)
        with contextlib.suppress(OSError):  # if it died, lines() ends and wait() tells how
            worker.send(task, log_path)
        return handle

    def finished(self, handle: ResidentHandle) -> None:
        worker = handle.worker
        if handle.report is None:
            worker.record.failed.append(handle.batch)
            died = worker.proc.poll() is not None
            worker.stop("failure" if died else "stopped mid-batch", graceful=False)
            return
        worker.note(handle.report, handle.batch)
        reason = worker.retire_reason()
        if reason is not None or self._closed:
            log.info("resident worker %d is replaced: %s", worker.record.id, reason or "end")
            worker.stop(reason or "end")
            return
        with self._lock:
            self._idle.setdefault((worker.key, worker.slot_key), []).append(worker)
            if worker.limits.idle_s > 0:
                timer = threading.Timer(worker.limits.idle_s, self._expire, (worker,))
                timer.daemon = True
                worker.idle_timer = timer
                timer.start()

    def _expire(self, worker: ResidentWorker) -> None:
        with self._lock:
            idle = self._idle.get((worker.key, worker.slot_key), [])
            if worker not in idle:
                return  # taken again meanwhile
            idle.remove(worker)
        worker.stop(f"idle {worker.limits.idle_s:g} s")

    def records(self, job_dir: Path | None = None) -> list[dict[str, Any]]:
        """Workers (all, or those that rendered a batch of `job_dir`), as dicts."""
        prefix = f"{job_dir}#" if job_dir is not None else ""
        with self._lock:
            workers = list(self._all)
        out = []
        for w in workers:
            if job_dir is None or any(b.startswith(prefix)
                                      for b in [*w.record.batches, *w.record.failed]):
                out.append(w.record.to_dict())
        return out

    def close(self) -> None:
        """Stop every worker (end of the command, or a signal)."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._idle.clear()
        for w in workers:
            w.stop("end")
