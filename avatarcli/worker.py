"""The batch process: `python -m avatarcli.worker [--rung K] [--gpus IDS] [--port N]
[--threads N] JOB_DIR INDEX` (its task and slot: avatarcli.slot.WorkerTask).

Renders one part under a temporary name, verifies it, renames it, exits. It reads the
manifest but never writes it (the parent does). Progress goes to stdout as `progress N` lines;
logs go to stderr, which the parent sends to the batch's log file.

`python -m avatarcli.worker --resident` is a resident worker: it takes batch after batch as
JSON lines on stdin (WorkerTask.to_dict() and "log"), keeps the engine's model loaded
between them, answers each with `progress N` lines and one `done {...}` line (its memory after
the batch), logs each batch into that batch's log file, and exits with the batch process's
codes on the first failure (the runner then replaces it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from avatarcli import engines, presets
from avatarcli.engines.base import Engine, PartTask
from avatarcli.errors import (
    AvatarError,
    EnvironmentProblem,
    ExitStatus,
    OutOfMemoryError,
    from_os_error,
)
from avatarcli.job import JobDir, Manifest
from avatarcli.media.verify import check_video
from avatarcli.options import Preset
from avatarcli.slot import WorkerTask

log = logging.getLogger("avatarcli.worker")


class Orphaned(Exception):
    """The parent died (or nobody reads our progress): stop rather than render for nobody."""


def load_task(task: WorkerTask) -> tuple[JobDir, Preset, PartTask]:
    """The job, the preset (with out-of-memory retry rungs 1..rung applied) and the part to
    render. Sets this process's environment from the task's slot first."""
    os.environ.update(task.slot.environ())
    index, rung = task.index, task.rung
    job = JobDir(task.job_dir)
    manifest = Manifest.from_dict(job.load())
    values = manifest.preset["values"]
    if rung:  # an out-of-memory retry: the preset's lighter settings, rungs 1..k
        values = presets.rung_values(values, values["oom_retry"], rung)
        log.info("batch %d: out-of-memory retry rung %d: %s", index, rung,
                 values["oom_retry"][rung - 1])
    preset = presets.build(values, f"{job.manifest_path} preset")
    return job, preset, manifest.task(job, index, overlap_frames=engines.seam_overlap(preset),
                                      env=task.slot.engine_env())


def render_part(task: WorkerTask) -> None:
    job, preset, part = load_task(task)
    engine = engines.create(preset)
    try:
        render_with(engine, job, part)
    finally:
        engine.close()


def render_with(engine: Engine, job: JobDir, task: PartTask) -> None:
    """Render, verify and publish one part with `engine`."""
    index = task.batch.index
    parent = os.getppid()
    # Progress counts the batch's planned frames; with a seam overlap the engine renders more.
    planned = job.load()["plan"]["batches"][index]
    scale = (planned["frame_end"] - planned["frame_start"]) / task.batch.frames

    def progress(done: int) -> None:
        if os.getppid() != parent:
            raise Orphaned(f"parent process {parent} is gone")
        try:
            print(f"progress {round(done * scale)}", flush=True)
        except BrokenPipeError:  # whoever read our progress is gone (a dead cluster worker)
            raise Orphaned("nobody reads this batch's progress any more") from None

    # Earlier attempts' temporaries: a stale attempt still writing loses its file and can no
    # longer rename it into place.
    for stale in (job.path / "parts").glob(f".part-{index:04d}.*.tmp.mp4"):
        stale.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        engine.render(task, progress)
        b = task.batch
        # Packets, not pixels: every engine's part is encoded by our own ffmpeg/libx264
        # (media.VideoWriter or media.normalise, which raise unless ffmpeg exits cleanly),
        # and x264 writes exactly one packet per frame it was given, so reading every
        # packet out of the container (as -c copy does) and counting the planned number
        # proves the part is whole and complete; decoding 1500 frames again took ~0.3 s of
        # a 60 s job's ~2.8 s (measured at 512x512) and proved nothing more about our file.
        check_video(task.out, frames=b.frames, width=task.inputs.width,
                    height=task.inputs.height, fps=task.inputs.fps, decode=False)
        os.replace(task.out, job.part(index))
    finally:
        with contextlib.suppress(OSError):
            task.out.unlink(missing_ok=True)
    log.info("batch %d: %d frames in %.1f s", index, task.batch.frames,
             time.monotonic() - started)


def watch_parent(parent: int, interval_s: float = 0.5) -> None:
    """If the parent dies (even by SIGKILL), stop this batch and everything it started.

    The batch process leads its own process group, so one signal reaches a model's
    torchrun and its children too. Runs as a daemon thread.
    """

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        log.error("parent process %d is gone; stopping this batch", parent)
        os.killpg(os.getpgid(0), signal.SIGTERM)

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


def tree_rss_mb(pid: int | None = None) -> float:
    """Resident memory of this process and everything it started (MiB)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


class _Resident:
    """What a resident worker keeps between batches: the engine holding the loaded model."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.report: dict[str, object] = {}

    def render(self, spec: WorkerTask) -> None:
        job, preset, task = load_task(spec)
        fresh = engines.create(preset)
        if self.engine is not None and not fresh.take_over(self.engine):
            self.engine.close()  # another model: the old one goes
        self.engine = fresh
        started = time.monotonic()
        render_with(fresh, job, task)
        self.report = {"index": task.batch.index, "seconds": time.monotonic() - started,
                       "rss_mb": round(tree_rss_mb(), 1), "gpu": fresh.memory_report(),
                       **fresh.worker_facts()}
        log.info("batch %d done in a resident worker: %s", task.batch.index, self.report)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def serve() -> int:
    """The resident worker's loop (see the module docstring); its exit code."""
    state = _Resident()
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            spec = json.loads(line)
            with _log_into(Path(spec["log"])):  # errors too go to that batch's log
                code = _exit_code(functools.partial(state.render, WorkerTask.from_dict(spec)))
            if code != ExitStatus.OK:
                return code
            print("done " + json.dumps(state.report), flush=True)
    finally:
        state.close()
    return ExitStatus.OK


def _exit_code(fn: Callable[[], None]) -> int:
    """Run one batch; its failure as the batch process's exit code, logged."""
    try:
        fn()
    except Orphaned as exc:
        log.error("stopping: %s", exc)
        return ExitStatus.ORPHANED
    except OutOfMemoryError as exc:
        log.error("out of memory: %s", exc)
        return ExitStatus.OUT_OF_MEMORY
    except EnvironmentProblem as exc:
        log.error("%s", exc)
        return ExitStatus.ENVIRONMENT
    except OSError as exc:  # a full disk while writing the part: the machine, not the job
        known = from_os_error(exc)
        if not isinstance(known, EnvironmentProblem):
            raise
        log.error("%s", known)
        return ExitStatus.ENVIRONMENT
    except AvatarError as exc:
        log.error("%s", exc)
        return ExitStatus.ENGINE
    return ExitStatus.OK


@contextlib.contextmanager
def _log_into(path: Path) -> Iterator[None]:
    """Point this process's stderr (fd 2: logging, and children's output that goes through
    it) at one batch's log while it renders."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"# {time.strftime('%Y-%m-%d %H:%M:%S')} resident worker pid "
                     f"{os.getpid()}\n".encode())
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resident = args == ["--resident"]
    task = None if resident else WorkerTask.parse(args)  # bad arguments: usage, exit 2
    if os.getpgid(0) == os.getpid():  # only when started as a group leader by the runner
        watch_parent(os.getppid())
    if task is None:
        return serve()
    return _exit_code(functools.partial(render_part, task))


if __name__ == "__main__":
    sys.exit(main())
