"""The batch process: `python -m avatarcli.worker JOB_DIR INDEX`.

Renders one part under a temporary name, verifies it, renames it, exits. It reads the
manifest but never writes it (the parent does). Progress goes to stdout as `progress N` lines;
logs go to stderr, which the parent sends to the batch's log file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from avatarcli import engines, presets
from avatarcli.engines.base import JobInputs, PartTask
from avatarcli.errors import AvatarError, OutOfMemoryError
from avatarcli.job import JobDir
from avatarcli.plan import Plan, render_range
from avatarcli.verify import check_video

log = logging.getLogger("avatarcli.worker")

EXIT_FAILED = 3
EXIT_OOM = 4
EXIT_ORPHANED = 70  # the parent died: stop rather than render for nobody


class Orphaned(Exception):
    pass


def task_from_manifest(job: JobDir, manifest: dict, index: int,
                       env: dict[str, str] | None = None, overlap_frames: int = 0) -> PartTask:
    """The PartTask for batch `index`, built from the manifest alone; with a seam overlap
    the batch starts `overlap_frames` earlier (see plan.render_range)."""
    plan = Plan.from_dict(manifest["plan"])
    face = manifest.get("face")
    inputs = JobInputs(
        audio=Path(manifest["inputs"]["audio"]["path"]),
        image=Path(manifest["inputs"]["image"]["path"]),
        job_dir=job.path, portrait=job.portrait, features=job.features,
        width=plan.width, height=plan.height, fps=plan.fps,
        face=(face[0], face[1], face[2], face[3]) if face else None,
    )
    return PartTask(inputs=inputs, batch=render_range(plan, index, overlap_frames),
                    out=job.temp_part(index),
                    engine_state=manifest.get("engine_state", {}), env=env or {})


def render_part(job_dir: Path, index: int) -> None:
    job = JobDir(job_dir)
    manifest = job.load()
    values = manifest["preset"]["values"]
    rung = int(os.environ.get("AVATARCLI_RUNG", "0"))
    if rung:  # an out-of-memory retry: the preset's lighter settings, rungs 1..k
        values = presets.rung_values(values, values["oom_retry"], rung)
        log.info("batch %d: out-of-memory retry rung %d: %s", index, rung,
                 values["oom_retry"][rung - 1])
    preset = presets.build(values, f"{job.manifest_path} preset")
    env = json.loads(os.environ.get("AVATARCLI_SLOT_ENV", "{}"))
    task = task_from_manifest(job, manifest, index, env, preset.overlap_frames())
    engine = engines.create(preset)
    parent = os.getppid()
    # Progress counts the batch's planned frames; with a seam overlap the engine renders more.
    planned = manifest["plan"]["batches"][index]
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
        check_video(task.out, frames=b.frames, width=task.inputs.width,
                    height=task.inputs.height, fps=task.inputs.fps)
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args) != 2:
        print("usage: python -m avatarcli.worker JOB_DIR INDEX", file=sys.stderr)
        return 2
    if os.getpgid(0) == os.getpid():  # only when started as a group leader by the runner
        watch_parent(os.getppid())
    try:
        render_part(Path(args[0]), int(args[1]))
    except Orphaned as exc:
        log.error("stopping: %s", exc)
        return EXIT_ORPHANED
    except OutOfMemoryError as exc:
        log.error("out of memory: %s", exc)
        return EXIT_OOM
    except AvatarError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
