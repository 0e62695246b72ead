"""Batch processes on a Ray cluster: the same worker command, run by a Ray task on some node.

`RayExecutor` implements the runner's `Executor` protocol. Each batch becomes one Ray task
(a streaming generator) that starts the usual `python -m avatarcli.worker JOB_DIR INDEX ...`
as a subprocess in its own session on whatever node runs the task, so a batch still gets a
fresh process and its memory is still returned when it ends. The task streams the batch process's
stdout lines (`progress N`) back to the driver as they come and ends with one item that holds
the exit code and the batch's telemetry, measured by a `Sampler` on that node.

On its node the task gives the batch, in its slot (the worker's arguments), the GPUs Ray
assigned to it (the driver's GPU ids mean nothing there) and, when the slot names a torchrun
port, a port that is free on that node. Ray Client (`ray://` addresses) cannot run streaming
tasks: there each task returns all its items at once when the batch ends, so progress
arrives per batch instead of live.

Contract: shared storage. The command's Python (`sys.executable` of the driver), the job
directory and the inputs must exist at the same paths on every node, and Ray's workers there
must import avatarcli (start the cluster from the same environment); `check_shared_paths`
checks this before anything is submitted.

Faults:

* A node (or the Ray worker running a task) that dies: Ray runs the task again, at most
  `max_retries` times. The batch process of the dead attempt sees its parent vanish and stops
  itself (the worker's watchdog); a part is only ever renamed into place after it has been
  verified, and every attempt starts by deleting the temporary part, so a half-written part is
  never taken for a done one. When the retries are used up, `wait()` returns `EXIT_TASK_LOST`
  and the batch's log says `ray: task lost: ...`.
* `stop()` cancels the task. The task kills its batch process group (SIGTERM, then SIGKILL);
  if the task does not end within the grace period the Ray worker itself is killed, and the
  batch process then stops itself through its watchdog.

Ray is imported lazily: avatarcli works without it, and `RayExecutor()` raises InputError
when it is missing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import logging
import os
import queue
import re
import shlex
import signal
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avatarcli import procs
from avatarcli.errors import EngineError, ExitStatus, InputError
from avatarcli.presets import ResolvedPreset
from avatarcli.slot import WorkerTask
from avatarcli.telemetry import Sampler, Telemetry

if TYPE_CHECKING:
    from avatarcli.options import Preset

log = logging.getLogger(__name__)

# What `wait()` returns when Ray gave up on a task: its node died (or its Ray worker crashed)
# on every attempt. Negative like a signal, so the runner reports "killed by signal 9".
EXIT_TASK_LOST = -int(signal.SIGKILL)
# What `wait()` returns after `stop()`: the task was cancelled and its batch process stopped.
EXIT_TASK_CANCELLED = -int(signal.SIGTERM)

NEEDS_RAY = "--executor ray needs Ray: pip install 'avatarcli[ray]'"
_EXIT_LINE = "ray: batch process exited with code "
# torch.distributed's rendezvous port of torchrun-launched engines; each task replaces it
# with one that is free on its node.
_TORCHRUN_BASE_PORT = 29101


def _import_ray() -> Any:
    """The `ray` module, typed loosely so this file type-checks with or without Ray."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise InputError(NEEDS_RAY) from exc


def _append_log(path: Path, text: str) -> None:
    """One line (or a few) at the end of a batch's log; never fails the caller."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
    except OSError as exc:
        log.warning("%s: cannot write to the batch log: %s", path, exc)


# ---------------------------------------------------------------------------------------------
# Ray tasks. Module-level functions, so Ray's workers import them from avatarcli.


def _node_name() -> str:
    ray = _import_ray()
    ip = importlib.import_module("ray.util").get_node_ip_address()
    node_id = ray.get_runtime_context().get_node_id()
    return f"node {ip} ({node_id[:12]}, {socket.gethostname()})"


def _batch_task(task: WorkerTask, log_path: str, ray_gpus: bool) -> Iterator[tuple[Any, ...]]:
    """Runs on a node: one batch process; yields ("start", pid, node), ("line", text)...,
    then ("end", returncode, telemetry)."""
    ray = _import_ray()
    where = _node_name()
    slot = task.slot
    if ray_gpus:
        # The GPUs Ray gave this task on this node, not the ones the driver's slot named.
        ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        slot = dataclasses.replace(slot, gpus=tuple(str(i) for i in ids))
    if slot.port is not None:
        # Tasks of other slots, rows or drivers may share this node: a port free here.
        slot = dataclasses.replace(slot, port=procs.free_port())
    cmd = dataclasses.replace(task, slot=slot).command()
    proc = procs.spawn(cmd, Path(log_path),
                       header=f"ray {where} worker pid {os.getpid()}: {shlex.join(cmd)}")
    sampler = Sampler(proc.pid, slot.gpu_ids).start()
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode("utf-8", "replace").strip())
        lines.put(None)

    threading.Thread(target=pump, name="batch-stdout", daemon=True).start()
    ended = False
    try:
        yield ("start", proc.pid, where)
        while True:
            # A short timeout keeps this frame in Python code, so the KeyboardInterrupt that
            # ray.cancel() raises lands here even while the batch prints nothing.
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            yield ("line", line)
        rc = proc.wait()
        ended = True
        telemetry = sampler.stop().to_dict()
        _append_log(Path(log_path), f"{_EXIT_LINE}{rc} on {where}")
        yield ("end", rc, telemetry)
    finally:
        if not ended:  # cancelled, interrupted or closed: take the batch process down too
            _append_log(Path(log_path), f"ray: task stopped; stopping its batch process "
                                        f"group {proc.pid} on {where}")
            procs.kill_group(proc)
            sampler.stop()


def _batch_task_whole(task: WorkerTask, log_path: str, ray_gpus: bool) -> list[tuple[Any, ...]]:
    """`_batch_task` as one return value, for Ray Client, which cannot stream."""
    return list(_batch_task(task, log_path, ray_gpus))


def _check_paths_task(paths: list[str], writable: list[str]) -> tuple[str, list[str]]:
    """Runs on a node: its name and the problems with `paths` there."""
    problems = [f"{p}: missing" for p in paths if not os.path.exists(p)]
    for p in writable:
        if not os.path.exists(p):
            problems.append(f"{p}: missing")
        elif not os.access(p, os.W_OK):
            problems.append(f"{p}: not writable")
    return _node_name(), problems


# ---------------------------------------------------------------------------------------------
# The driver's side.

_last_executor: weakref.ref[RayExecutor] | None = None  # the one check_shared_paths() uses


def check_shared_paths(paths: Sequence[Path], executor: RayExecutor | None = None, *,
                       writable: Sequence[Path] = (), timeout_s: float = 60.0) -> None:
    """`RayExecutor.check_shared_paths` of `executor`, by default of the RayExecutor made last
    in this process (else one for address "auto"). Initialises Ray: call it from the main
    thread, before the job starts."""
    if executor is None:
        executor = _last_executor() if _last_executor is not None else None
    if executor is None:
        executor = RayExecutor("auto")
    executor.check_shared_paths(paths, writable=writable, timeout_s=timeout_s)


class RayHandle:
    """One batch running as a Ray task. Lines arrive through a thread that reads the stream."""

    def __init__(self, ray: Any, gen: Any, log_path: Path, *, max_retries: int,
                 stop_grace_s: float, stream: bool = True) -> None:
        self.pid: int | None = None  # the batch process's pid on its node, once it started
        self.node: str | None = None
        self._ray = ray
        self._gen = gen  # an ObjectRefGenerator, or one ObjectRef when not streaming
        self._stream = stream
        self._log_path = log_path
        self._max_retries = max_retries
        self._stop_grace_s = stop_grace_s
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self._stopping = False
        self._rc: int | None = None
        self._telemetry: dict[str, Any] = {}
        self._started = time.monotonic()
        self._started_at = time.time()
        self._thread = threading.Thread(target=self._consume, name="ray-batch", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        ray = self._ray
        exc_mod = importlib.import_module("ray.exceptions")
        rc: int | None = None
        try:
            # Streaming: one object per item, as they come. Otherwise (Ray Client cannot
            # stream) one object with every item, when the batch has ended.
            items = (ray.get(ref) for ref in self._gen) if self._stream else ray.get(self._gen)
            for item in items:
                if item[0] == "line":
                    self._lines.put(item[1])
                elif item[0] == "start":
                    self.pid, self.node = item[1], item[2]
                elif item[0] == "end":
                    rc, self._telemetry = int(item[1]), dict(item[2])
            if rc is None:
                rc = self._rc_from_log()
        except exc_mod.TaskCancelledError:
            rc = EXIT_TASK_CANCELLED
            _append_log(self._log_path, "ray: task cancelled")
        except exc_mod.OutOfMemoryError as exc:
            # The node ran out of host memory: like the batch's own out-of-memory exit, so
            # the runner may retry with lighter settings.
            rc = ExitStatus.OUT_OF_MEMORY
            _append_log(self._log_path, f"ray: out of memory: Ray's memory monitor killed the "
                                        f"task's worker ({_first_line(exc)})")
        except exc_mod.RayTaskError as exc:
            # It failed on its node before or around the batch process (the command's Python
            # missing there, the task not schedulable): the code of a failed batch.
            rc = ExitStatus.ENGINE
            cause = getattr(exc, "cause", None) or exc
            _append_log(self._log_path, f"ray: task failed: {type(cause).__name__}: "
                                        f"{_first_line(cause)}")
        except exc_mod.RayError as exc:
            if self._stopping:  # stop() had to kill the worker: still a cancel
                rc = EXIT_TASK_CANCELLED
                _append_log(self._log_path, "ray: task cancelled (its worker was killed)")
            else:
                rc = EXIT_TASK_LOST
                _append_log(self._log_path,
                            f"ray: task lost: node died or its worker crashed, and Ray's "
                            f"retries (max_retries={self._max_retries}) are used up: "
                            f"{type(exc).__name__}: {_first_line(exc)}")
        except Exception as exc:  # the driver lost its cluster, or something unforeseen
            rc = EXIT_TASK_LOST
            _append_log(self._log_path, f"ray: task lost: {type(exc).__name__}: "
                                        f"{_first_line(exc)}")
        finally:
            self._rc = EXIT_TASK_LOST if rc is None else rc
            if not self._telemetry:  # nothing from the node: what the driver saw
                self._telemetry = Telemetry(wall_s=time.monotonic() - self._started,
                                            started_at=self._started_at).to_dict()
            self._lines.put(None)
            self._done.set()

    def _rc_from_log(self) -> int:
        """The exit code when the stream ended without its last item.

        A retried task's items replace the first attempt's by position, and Ray drops those
        the driver has already read; an attempt that printed fewer lines than the one before
        it loses its last item. Its exit code is also the last `_EXIT_LINE` of the log.
        """
        try:
            text = self._log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        found = re.findall(rf"^{re.escape(_EXIT_LINE)}(-?\d+)", text, re.MULTILINE)
        if found:
            return int(found[-1])
        _append_log(self._log_path, "ray: task lost: it ended without reporting an exit code")
        return EXIT_TASK_LOST

    def lines(self) -> Iterator[str]:
        while (line := self._lines.get()) is not None:
            yield line
        self._lines.put(None)  # a second reader ends too

    def wait(self) -> int:
        self._done.wait()
        assert self._rc is not None
        return self._rc

    def stop(self) -> None:
        """Cancel the task; its batch process group is killed on its node."""
        if self._done.is_set():
            return
        self._stopping = True
        ray = self._ray
        with contextlib.suppress(Exception):
            ray.cancel(self._gen, force=False)  # KeyboardInterrupt in the task: it kills its group
        if self._done.wait(self._stop_grace_s):
            return
        log.warning("ray task of %s did not stop within %.0f s; killing its worker",
                    self._log_path.name, self._stop_grace_s)
        with contextlib.suppress(Exception):
            ray.cancel(self._gen, force=True)  # the batch's watchdog sees its parent go
        self._done.wait(self._stop_grace_s)

    def telemetry(self) -> dict[str, Any]:
        return self._telemetry


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def batch_resources(preset: Preset | ResolvedPreset) -> tuple[float, float]:
    """(CPUs, GPUs) one batch of `preset` asks of a node: what its engine declares
    (Engine.resources)."""
    from avatarcli import engines

    p = preset.preset if isinstance(preset, ResolvedPreset) else preset
    need = engines.engine_class(p.engine).resources(p)
    return need.cpus, need.gpus


class RayExecutor:
    """Runs each batch process as a Ray task on some node of a Ray cluster.

    address: "local" starts a Ray instance inside this process (this machine only); "auto"
    joins the cluster this machine belongs to (`ray start`); "ray://HOST:PORT" or
    "HOST:PORT" connects to that cluster. Ray is initialised once, on first use; a Ray that
    is already initialised in this process is used as it is.
    """

    def __init__(self, address: str = "auto", *, num_gpus_per_task: float = 0,
                 num_cpus_per_task: float = 1, max_retries: int = 2,
                 runtime_env: dict[str, Any] | None = None,
                 init_kwargs: dict[str, Any] | None = None,
                 stop_grace_s: float = 15.0, stream: bool | None = None) -> None:
        if num_gpus_per_task < 0 or num_cpus_per_task < 0:
            raise InputError("Ray tasks cannot ask for a negative number of CPUs or GPUs")
        if max_retries < 0:
            raise InputError(f"max_retries must be 0 or more, got {max_retries}")
        self._ray = _import_ray()
        self.address = address
        self.num_gpus_per_task = num_gpus_per_task
        self.num_cpus_per_task = num_cpus_per_task
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self.init_kwargs = dict(init_kwargs or {})  # extra ray.init() arguments
        self.stop_grace_s = stop_grace_s
        # Ray Client (ray://) has no streaming tasks: a batch's lines then come when it ends.
        self.stream = not address.startswith("ray://") if stream is None else stream
        self._lock = threading.Lock()
        self._owns_ray = False
        self._closed = False
        self._remote: Any = None
        global _last_executor
        _last_executor = weakref.ref(self)

    @classmethod
    def for_preset(cls, preset: Preset | ResolvedPreset, address: str = "auto", *,
                   max_retries: int = 2, runtime_env: dict[str, Any] | None = None,
                   init_kwargs: dict[str, Any] | None = None) -> RayExecutor:
        """An executor that asks what one batch of `preset` needs (see batch_resources)."""
        cpus, gpus = batch_resources(preset)
        return cls(address, num_gpus_per_task=gpus, num_cpus_per_task=cpus,
                   max_retries=max_retries, runtime_env=runtime_env, init_kwargs=init_kwargs)

    def for_row(self, preset: Preset | ResolvedPreset) -> RayExecutor:
        """This executor (same cluster, same connection) asking what one batch of `preset`
        needs: each row of a manifest gets its own preset's resources, not the first row's."""
        view = copy.copy(self)
        view.num_cpus_per_task, view.num_gpus_per_task = batch_resources(preset)
        return view

    def task_options(self) -> dict[str, Any]:
        """The `.options(...)` every batch task is submitted with."""
        opts: dict[str, Any] = {
            "num_returns": "streaming" if self.stream else 1,
            "num_cpus": self.num_cpus_per_task,
            "num_gpus": self.num_gpus_per_task,
            "max_retries": self.max_retries,  # node or worker death only
            "retry_exceptions": False,  # a batch that fails is reported, not run again
        }
        if self.runtime_env:
            opts["runtime_env"] = self.runtime_env
        return opts

    def slots(self, jobs: int) -> list[dict[str, str]]:
        """The runner's slots for `jobs` tasks in flight, instead of `engine.slots()`: no GPU
        ids (Ray picks the GPUs on the node), and a torchrun port that each task replaces with
        one that is free on its node."""
        return [{"MASTER_PORT": str(_TORCHRUN_BASE_PORT + i)} for i in range(jobs)]

    # -- Ray's lifetime ----------------------------------------------------------------------

    def ensure_ray(self) -> Any:
        """Initialise Ray (once per process) and return the `ray` module."""
        ray = self._ray
        with self._lock:
            if self._closed:
                raise EngineError("the Ray executor has been shut down")
            if ray.is_initialized():
                return ray
            kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
            if self.address == "local":
                kwargs.update(address="local", include_dashboard=False)
            else:
                kwargs.update(address=self.address)
            kwargs.update(self.init_kwargs)
            # ray.init() replaces the SIGTERM handler (with sys.exit) when called from the main
            # thread; keep the caller's, so an interrupted job still stops the way it should.
            main = threading.current_thread() is threading.main_thread()
            sigterm = signal.getsignal(signal.SIGTERM) if main else None
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                hint = ("; start one with `ray start --head`, or use --ray-address local"
                        if self.address == "auto" else "")
                raise InputError(f"cannot start or reach the Ray cluster at "
                                 f"'{self.address}': {_first_line(exc)}{hint}") from exc
            finally:
                if main and sigterm is not None:
                    signal.signal(signal.SIGTERM, sigterm)
            self._owns_ray = True
            return ray

    def shutdown(self) -> None:
        """Disconnect from Ray (and stop a local instance) if this executor started it.
        The executor starts nothing after this."""
        with self._lock:
            if self._owns_ray and self._ray.is_initialized():
                self._ray.shutdown()
            self._owns_ray = False
            self._closed = True
            self._remote = None

    # -- the Executor protocol ---------------------------------------------------------------

    def start(self, task: WorkerTask, log_path: Path) -> RayHandle:
        """Submit `task` as a Ray task; its stderr goes to `log_path` (shared storage)."""
        ray = self.ensure_ray()
        with self._lock:
            if self._remote is None:
                self._remote = ray.remote(_batch_task if self.stream else _batch_task_whole)
            remote = self._remote
        opts = self.task_options()
        opts["name"] = f"avatarcli-batch-{task.index}"
        gen = remote.options(**opts).remote(task, str(log_path), self.num_gpus_per_task > 0)
        return RayHandle(ray, gen, log_path, max_retries=self.max_retries,
                         stop_grace_s=self.stop_grace_s, stream=self.stream)

    # -- checks before a job ------------------------------------------------------------------

    def _fits(self, node: dict[str, Any]) -> bool:
        res = node.get("Resources") or {}
        return (res.get("CPU", 0) >= self.num_cpus_per_task
                and res.get("GPU", 0) >= self.num_gpus_per_task)

    def check_resources(self) -> list[dict[str, Any]]:
        """The alive nodes that can run one batch task; InputError when there is none (a
        cluster that adds nodes on demand must have one such node up before a job)."""
        ray = self.ensure_ray()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        fit = [n for n in alive if self._fits(n)]
        if not fit:
            have = "; ".join(f"{n.get('NodeManagerAddress')}: "
                             f"{(n.get('Resources') or {}).get('CPU', 0):g} CPU, "
                             f"{(n.get('Resources') or {}).get('GPU', 0):g} GPU" for n in alive)
            raise InputError(f"no node of the Ray cluster has {self.num_cpus_per_task:g} CPU "
                             f"and {self.num_gpus_per_task:g} GPU for a batch "
                             f"(nodes: {have or 'none'})")
        return fit

    def check_shared_paths(self, paths: Sequence[Path], *, writable: Sequence[Path] = (),
                           timeout_s: float = 60.0) -> None:
        """Check on every alive node that can run a batch that `paths` exist (and `writable`
        exist and are writable); InputError naming each node and its missing paths."""
        ray = self.ensure_ray()
        strategy = importlib.import_module("ray.util.scheduling_strategies")
        ray_errors = importlib.import_module("ray.exceptions")
        nodes = self.check_resources()
        remote = ray.remote(_check_paths_task)
        args = ([str(p) for p in paths], [str(p) for p in writable])
        refs = []
        for node in nodes:
            opts: dict[str, Any] = {
                "num_cpus": 0, "max_retries": 0, "name": "avatarcli-check-paths",
                "scheduling_strategy": strategy.NodeAffinitySchedulingStrategy(
                    node_id=node["NodeID"], soft=False)}
            if self.runtime_env:
                opts["runtime_env"] = self.runtime_env
            refs.append(remote.options(**opts).remote(*args))
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        problems: list[str] = []
        for node, ref in zip(nodes, refs, strict=True):
            name = f"node {node.get('NodeManagerAddress')} ({str(node['NodeID'])[:12]})"
            if ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
                problems.append(f"{name}: did not answer within {timeout_s:g} s")
                continue
            try:
                name, missing = ray.get(ref)
            except ray_errors.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                problems.append(f"{name}: cannot run avatarcli there ({type(cause).__name__}: "
                                f"{_first_line(cause)}); Ray's workers on every node need "
                                f"avatarcli installed")
                continue
            problems.extend(f"{name}: {m}" for m in missing)
        if problems:
            raise InputError("the Ray executor needs the same paths on every node (shared "
                             "storage):\n" + "\n".join(f"  {p}" for p in problems))
