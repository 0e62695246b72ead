"""`generate`: speech + portrait -> verified MP4. The core API the CLI calls; it never prints.

Flow: validate everything -> analyse audio -> plan -> job directory -> one process per pending
batch -> assemble -> verify -> publish atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatarcli import analysis, engines, history, presets
from avatarcli.check import seam_tag
from avatarcli.engines.base import Engine, JobInputs, PartTask
from avatarcli.errors import AvatarError, InputError
from avatarcli.job import JobDir, JobLock, file_digest, job_key, now, part_digest
from avatarcli.media import portrait, streams
from avatarcli.media.assemble import assemble
from avatarcli.media.ffmpeg_bin import ffmpeg_exe
from avatarcli.media.verify import is_whole
from avatarcli.options import Preset, rendering_values
from avatarcli.plan import Plan, lead_frames, make_plan, render_range
from avatarcli.presets import ResolvedPreset, parse_size
from avatarcli.resident import ResidentPool
from avatarcli.runner import BatchResult, Executor, Hooks, Resident, Runner
from avatarcli.telemetry import Telemetry, aggregate

log = logging.getLogger(__name__)
TAG_PREFIX = "avatarcli job "  # the output's comment tag: which job made it


@dataclass
class Events:
    """How the core reports while it works; the CLI overrides these (bars, warnings)."""

    def warn(self, message: str) -> None:
        log.warning("%s", message)

    def info(self, message: str) -> None:
        log.info("%s", message)

    @contextlib.contextmanager
    def progress(self, total_frames: int, done_frames: int) -> Iterator[Any]:
        """A context whose value has `update(n)`; the default reports nothing."""

        class _Null:
            def update(self, n: int) -> None:
                pass

        yield _Null()


@dataclass(frozen=True)
class BatchView:
    index: int
    frame_start: int
    frame_end: int
    start_s: float
    end_s: float
    clips: int
    state: str
    command: str | None = None
    rung: int = 0  # out-of-memory retry rung that rendered it (0: the preset as given)
    telemetry: dict[str, Any] = field(default_factory=dict)  # wall, fps, peak RSS/GPU


@dataclass
class Result:
    output: Path
    job_dir: Path
    duration_s: float
    frames: int
    width: int
    height: int
    fps: int
    preset: str
    engine: str
    batches: list[BatchView]
    rendered: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    seconds: float = 0.0
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    telemetry: dict[str, Any] = field(default_factory=dict)  # the job's batches together
    # Resident workers: id, pid, load_s, render_s, batches, why each ended (a dry run: the
    # batches each worker will take).
    workers: list[dict[str, Any]] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)  # `avatar check` figures (model engines)

    def summary(self) -> dict[str, Any]:
        """The machine-readable summary printed by `--json`."""
        return {
            "output": str(self.output), "job_dir": str(self.job_dir),
            "duration_s": round(self.duration_s, 3), "frames": self.frames,
            "width": self.width, "height": self.height, "fps": self.fps,
            "preset": self.preset, "engine": self.engine,
            "batches": len(self.batches), "batches_rendered": self.rendered,
            "batches_reused": self.reused, "seconds": round(self.seconds, 2),
            "dry_run": self.dry_run, "warnings": self.warnings,
            "telemetry": self.telemetry, "check": self.check,
            "workers": self.workers,
            "plan": [vars(b) for b in self.batches],
        }


def planned_workers(batches: int, slots: int, max_batches: int) -> list[dict[str, Any]]:
    """Which batches each resident worker will take, if none is replaced early (memory
    bounds or a failure replace one sooner): slot s takes batches s, s+k, ... in turn, and a
    worker serves max_batches of them."""
    out: list[dict[str, Any]] = []
    for s in range(slots):
        mine = list(range(s, batches, slots))
        for start in range(0, len(mine), max_batches):
            out.append({"id": len(out) + 1, "slot": s, "batches": mine[start:start + max_batches]})
    return out


def default_output(audio: Path) -> Path:
    out = audio.with_suffix(".mp4")
    return out.with_name(audio.stem + ".avatar.mp4") if out == audio else out


def path_problem(path: Path, what: str) -> str | None:
    """Why `path` cannot be used as given (a symlink loop, a name that is not UTF-8 or too
    long, a path through a file), or None. Nothing is created."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return f"{path}: {what} path is not valid UTF-8; rename the file"
    try:
        os.stat(path)
    except FileNotFoundError:
        return None  # said by the caller, which knows whether it must exist
    except OSError as exc:
        return f"{path}: {what} path cannot be used ({exc.strerror})"
    except ValueError:  # a NUL byte
        return f"{str(path)!r}: {what} path contains a NUL byte"
    return None


def job_folder_of(path: Path) -> Path | None:
    """The job folder (`OUT.parts/` with a manifest or lock) that `path` lies inside, if any.

    Such a folder is removed when its job finishes, taking anything put there with it."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: reported by path_problem
        return None
    for folder in real.parents:
        if folder.name.endswith(".parts") and ((folder / "manifest.json").is_file()
                                               or (folder / "lock").is_file()):
            return folder
    return None


def name_problem(output: Path) -> str | None:
    """The output's name must leave room for its job folder (`NAME.parts`) and temporaries."""
    try:
        limit = os.pathconf(output.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(output.name)) + len(".parts") > limit:
        return (f"{output}: output file name is too long for this filesystem "
                f"(at most {limit - len('.parts')} bytes, to leave room for its job folder)")
    return None


def _check_paths(audio: Path, image: Path, output: Path, *, force: bool,
                 dry_run: bool) -> list[str]:
    problems = []
    for what, path in (("audio", audio), ("image", image)):
        bad = path_problem(path, what)
        if bad:
            problems.append(bad)
        elif not path.exists():
            problems.append(f"{path}: {what} file not found")
        elif not path.is_file():
            problems.append(f"{path}: {what} is not a file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{path}: {what} file is not readable")
        elif (inside := job_folder_of(path)) is not None:
            problems.append(f"{path}: {what} file lies inside the job folder {inside}, which "
                            f"is removed when that job finishes; move it elsewhere")
    bad = path_problem(output, "output") or path_problem(output.parent, "output folder")
    if bad:
        problems.append(bad)
        return problems
    folder = output.parent
    job = JobDir.for_output(output).path
    if not folder.is_dir():
        problems.append(f"{output}: output folder {folder} does not exist")
    elif not os.access(folder, os.W_OK | os.X_OK):
        problems.append(f"{output}: output folder {folder} is not writable")
    elif output.is_dir():
        problems.append(f"{output}: output is a folder")
    elif (inside := job_folder_of(output)) is not None:
        problems.append(f"{output}: output lies inside the job folder {inside}, which is "
                        f"removed when that job finishes; choose another folder")
    elif (too_long := name_problem(output)) is not None:
        problems.append(too_long)
    elif (job.exists() or job.is_symlink()) and not job.is_dir():
        problems.append(f"{job}: the job folder of {output.name} exists but is not a folder; "
                        f"move it away")
    elif output.exists() and not force and not dry_run:
        problems.append(f"{output}: output exists (use --force to overwrite)")
    try:
        if output.resolve() in (audio.resolve(), image.resolve()):
            problems.append(f"{output}: output would overwrite an input")
    except (OSError, RuntimeError):  # a symlink loop among the inputs: reported above
        pass
    return problems


def _check_audio(audio: Path) -> None:
    info = streams.probe(audio)
    if info.first("audio") is None:
        if info.format.endswith("_pipe") or info.format.startswith("image2"):
            kind = "not an audio file (it is an image)"
        elif info.first("video") is not None:
            kind = "a video file with no audio stream"
        else:
            kind = "not an audio file (no audio stream)"
        raise InputError(f"{audio}: {kind}")


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise InputError("\n".join(problems))


def generate(audio: Path, image: Path, resolved: ResolvedPreset, *, output: Path | None = None,
             jobs: int = 1, gpus: str | None = None, dry_run: bool = False, force: bool = False,
             keep_parts: bool = False, face: tuple[int, int, int, int] | None = None,
             events: Events | None = None, executor: Executor | None = None,
             pool: ResidentPool | None = None) -> Result:
    """Render `audio` + `image` to `output` (default: the audio's path with .mp4).

    Resumes a matching job in `OUTPUT.parts/`; raises InputError for bad input (nothing is
    created), EngineError when a batch or the verification fails (the job can be resumed).
    `pool`: resident workers shared with other jobs (`avatar batch`); by default a job whose
    engine renders in resident workers gets its own pool, closed at the end.
    """
    events = events or Events()
    started = time.monotonic()
    preset = resolved.preset
    output = (output or default_output(audio)).expanduser().absolute()
    audio, image = audio.expanduser().absolute(), image.expanduser().absolute()
    if jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {jobs}")
    engine = engines.create(preset)
    job = JobDir.for_output(output)

    # 1. Every input, the ffmpeg binary and the engine's set-up, all problems reported together.
    problems = _check_paths(audio, image, output, force=force, dry_run=dry_run)
    rgb = None
    ffmpeg_exe()  # a missing or broken ffmpeg is this machine's problem: said first, alone
    if not path_problem(audio, "audio") and audio.is_file():
        try:
            _check_audio(audio)
        except InputError as exc:
            problems.append(str(exc))
    if not path_problem(image, "image") and image.is_file():
        try:
            rgb = portrait.load(image)
        except InputError as exc:
            problems.append(str(exc))
    inputs = None
    warnings: list[str] = []
    if rgb is not None:
        src_h, src_w = rgb.shape[:2]
        if face and not (face[0] + face[2] <= src_w and face[1] + face[3] <= src_h):
            problems.append(f"--face {','.join(map(str, face))}: the box lies outside the image "
                            f"{image} ({src_w}x{src_h} px)")
            face = None
        width, height = engine.frame_size(parse_size(preset.size), src_w, src_h)
        out_face = portrait.map_box(face, src_w, src_h, width, height) if face else None
        inputs = JobInputs(audio=audio, image=image, job_dir=job.path, portrait=job.portrait,
                           features=job.features, width=width, height=height, fps=preset.fps,
                           face=out_face)
        engine_problems, warnings = engine.check(inputs)
        # A dry run still prints the commands, so engine set-up problems only warn there.
        (warnings if dry_run else problems).extend(engine_problems)
    _raise_all(problems)
    assert rgb is not None and inputs is not None
    # A cluster decides which GPUs a batch gets; on this machine the engine shares them out.
    slots = (executor.slots(jobs) if executor is not None else None) or engine.slots(jobs, gpus)

    # 2. Audio analysis (one streaming decode) and the plan.
    feats = analysis.analyse(audio, preset.fps)
    if feats.frames == 0:
        raise InputError(f"{audio}: audio has zero length")
    if feats.silent:
        warnings.append(f"{audio}: the audio is silence only; the mouth will stay closed")
    plan = make_plan(feats.frames, fps=preset.fps, width=inputs.width, height=inputs.height,
                     infer_frames=preset.infer_frames, clips_per_batch=preset.clips_per_batch,
                     loudness_db=feats.db)
    result = Result(output=output, job_dir=job.path, duration_s=feats.duration_s,
                    frames=plan.frames, width=plan.width, height=plan.height, fps=plan.fps,
                    preset=resolved.name, engine=preset.engine, batches=[], dry_run=dry_run,
                    warnings=warnings)
    for w in warnings:
        events.warn(w)
    if dry_run:
        result.batches = _views(plan, engine, inputs, job, {}, slots)
        if executor is None and engines.resident(preset):
            result.workers = planned_workers(len(plan.batches), len(slots),
                                             preset.worker.max_batches)
        result.seconds = time.monotonic() - started
        return result

    # 3-5. Under the job's lock: another live process rendering it makes this one stop.
    use_pool = executor is None and engines.resident(preset)
    own_pool = use_pool and pool is None
    if own_pool:
        pool = ResidentPool()
    try:
        with JobLock(job):
            if output.exists() and not force:  # it may have appeared while we were checking
                raise InputError(f"{output}: output exists (use --force to overwrite)")
            _run_job(job, engine, resolved, inputs, plan, feats, rgb, slots, result, events,
                     force=force, executor=executor, pool=pool if use_pool else None)
            if not keep_parts:
                job.remove()  # under the lock, so no other process starts on a half-removed job
    except OSError as exc:
        if exc.filename is None:  # a write through a library (an image, an array): say where
            exc.filename = str(job.path)
        raise
    finally:
        if own_pool and pool is not None:
            pool.close()
    result.seconds = time.monotonic() - started
    return result


def _run_job(job: JobDir, engine: Engine, resolved: ResolvedPreset, inputs: JobInputs,
             plan: Plan, feats: analysis.AudioFeatures, rgb: np.ndarray,
             slots: list[dict[str, str]], result: Result, events: Events, *,
             force: bool, executor: Executor | None, pool: ResidentPool | None) -> None:
    """Resume or start the job, render what is missing, assemble and verify the output."""
    preset = resolved.preset
    digests = {"audio": file_digest(inputs.audio), "image": file_digest(inputs.image)}
    key = _key(digests, preset, inputs.face)
    expected = {"plan": plan.to_dict(), "face": list(inputs.face) if inputs.face else None,
                "inputs": {k: v["sha256"] for k, v in digests.items()},
                "values": _rendering(preset)}
    manifest = _open_job(job, key, force=force, expected=expected)
    if manifest is None:
        manifest = _new_job(job, key, digests, resolved, plan, feats, rgb, inputs, engine,
                            events, result)
    else:
        result.warnings.extend(manifest.get("warnings", []))
        for w in manifest.get("warnings", []):
            events.warn(w)
    plan = Plan.from_dict(manifest["plan"])
    parts = manifest["parts"]
    if not job.audio.is_file():  # a job made before the timeline was kept in it
        _decode_timeline(job, inputs.audio, feats, plan)

    # A part is reused only if it is the very file that was verified (its content hash):
    # another valid video of the same length and size put in its place is rendered again.
    overlap = engines.seam_overlap(preset)
    reused = [p["index"] for p in parts if p["state"] == "done"
              and part_digest(job.part(p["index"])) == p.get("sha256")
              and is_whole(job.part(p["index"]),
                           frames=render_range(plan, p["index"], overlap).frames,
                           width=plan.width, height=plan.height, fps=plan.fps)]
    pending = [b.index for b in plan.batches if b.index not in reused]
    for i in pending:
        if parts[i]["state"] == "done":
            events.warn(f"{job.part(i)}: damaged or missing; rendering batch {i} again")
        parts[i].update(state="pending", pid=None)
    job.save(manifest)
    result.reused, result.rendered = reused, pending
    if reused:
        events.info(f"resuming {job.path}: {len(reused)} of {len(parts)} parts already done")

    # One process per pending batch.
    done_frames = sum(plan.batches[i].frames for i in reused)
    with events.progress(plan.frames, done_frames) as bar:
        hooks = _manifest_hooks(job, manifest, bar)
        resident = None
        if pool is not None:  # a model key per retry rung: a rung may need another model
            keys = [engines.create(presets.build(presets.rung_values(
                        {**preset.to_dict(), "oom_retry": []}, preset.oom_retry, k),
                        "oom_retry")).model_key() for k in range(len(preset.oom_retry) + 1)]
            resident = Resident(pool, keys, preset.worker)
        runner = Runner(job.path, job.log, slots=slots, cooldown_s=preset.cooldown_s,
                        oom_rungs=len(preset.oom_retry), hooks=hooks, executor=executor,
                        resident=resident,
                        timeout_s=lambda i: engines.timeout_s(preset, plan.batches[i].frames))
        try:
            runner.run(pending)
        finally:
            with hooks.lock:
                for p in parts:
                    if p["state"] == "running":
                        p.update(state="pending", pid=None)
                job.save(manifest)

    # Join, mux the original audio once, verify, publish.
    job.remove_temporaries()  # of an assembly killed in an earlier run
    assemble([job.part(b.index) for b in plan.batches], job.audio, result.output,
             leads=[lead_frames(plan.batches, b.index, overlap) for b in plan.batches],
             audio_s=feats.duration_s, frames=plan.frames, width=plan.width,
             height=plan.height, fps=plan.fps, tag=f"{TAG_PREFIX}{key}", work_dir=job.path,
             overwrite=force, seams=seam_tag([b.frame_start for b in plan.batches[1:]], overlap))
    manifest["finished"] = now()
    if pool is not None:
        manifest["workers"] = pool.records(job.path)
        result.workers = [{k: w[k] for k in ("id", "pid", "load_s", "render_s", "ended")}
                          | {"batches": len(w["batches"])} for w in manifest["workers"]]
    if preset.check and engines.engine_class(preset.engine).restarts:
        manifest["check"] = _post_check(result, inputs.audio, events)
    job.save(manifest)
    result.batches = _views(plan, engine, inputs, job, manifest, slots)
    result.telemetry = aggregate(p.get("telemetry") for p in parts)
    history.record(preset, result.telemetry)


def _rendering(preset: Preset) -> dict[str, Any]:
    return rendering_values(preset.to_dict())


def _post_check(result: Result, audio: Path, events: Events) -> dict[str, Any]:
    """`avatar check` on the published output: figures into the result, warnings shown."""
    from avatarcli import check

    try:
        report = check.check(result.output, audio)
    except AvatarError as exc:
        message = f"{result.output}: could not be checked ({exc})"
        events.warn(message)
        result.warnings.append(message)
        return {}
    result.check = check.quick_figures(report)
    for w in check.warnings(report):
        events.warn(w)
        result.warnings.append(w)
    return report.to_dict()


def _key(digests: dict[str, Any], preset: Preset, face: tuple[int, int, int, int] | None) -> str:
    rendering = _rendering(preset)
    rendering["face"] = list(face) if face else None
    return job_key(digests, rendering)


def output_is_current(output: Path, audio: Path, image: Path, preset: Preset) -> bool:
    """Whether `output` is a whole video that this tool made from these inputs and settings
    (its metadata carries the job key), so a batch rerun may skip it."""
    if not output.is_file():
        return False
    try:
        info = streams.probe(output)
    except AvatarError:
        return False
    if info.first("video") is None or info.first("audio") is None:
        return False
    digests = {"audio": file_digest(audio), "image": file_digest(image)}
    return info.tags.get("comment") == f"{TAG_PREFIX}{_key(digests, preset, None)}"


def _open_job(job: JobDir, key: str, *, force: bool,
              expected: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest when it belongs to this job; None to start a new job.

    With `force`, a job record that cannot be used as it is (damaged, hand-edited, another
    job's) is always discarded: --force starts over whatever is in the folder."""
    if not job.exists():
        return None
    try:
        manifest = job.load()
        if manifest["key"] == key:
            _check_consistent(job, manifest, expected)
    except InputError:
        if force:
            job.clear()
            return None
        raise
    if manifest["key"] == key:
        return manifest
    if not force:
        raise InputError(f"{job.path}: holds a job made from different inputs or settings; "
                         f"rerun with --force to discard it and start over")
    job.clear()
    return None


def _check_consistent(job: JobDir, manifest: dict[str, Any], expected: dict[str, Any]) -> None:
    """A record with this job's key must say what this job would say now (the plan, inputs,
    face and settings are all decided by the key); anything else was edited or damaged."""
    found = {"plan": manifest["plan"], "face": manifest.get("face"),
             "inputs": {k: v["sha256"] for k, v in manifest["inputs"].items()},
             "values": rendering_values(manifest["preset"]["values"])}
    for name, value in expected.items():
        if found[name] != value:
            raise InputError(f"{job.manifest_path}: job manifest is damaged ({name} differs "
                             f"from what its inputs and settings give); rerun with --force "
                             f"to start the job over")


def _decode_timeline(job: JobDir, audio: Path, feats: analysis.AudioFeatures,
                     plan: Plan) -> None:
    """Decode the recording once into the job (`audio.wav`); slicing and muxing use only
    that file, so the length planned is the length muxed, on every run."""
    seconds = streams.decode_to_wav(audio, job.audio)
    if analysis.frame_count(seconds, plan.fps) != plan.frames:
        job.audio.unlink(missing_ok=True)
        raise InputError(f"{audio}: decodes to {feats.duration_s:.3f} s in one pass and "
                         f"{seconds:.3f} s in another; re-encode it (e.g. to WAV) and retry")


def _new_job(job: JobDir, key: str, digests: dict[str, Any], resolved: ResolvedPreset,
             plan: Plan, feats: analysis.AudioFeatures, rgb: np.ndarray, inputs: JobInputs,
             engine: Engine, events: Events, result: Result) -> dict[str, Any]:
    from PIL import Image

    job.create()
    _decode_timeline(job, inputs.audio, feats, plan)
    fitted = portrait.fit(rgb, plan.width, plan.height)
    tmp = job.portrait.with_suffix(".tmp.png")
    Image.fromarray(fitted).save(tmp)
    os.replace(tmp, job.portrait)
    tmp = job.features.with_suffix(".tmp.npy")
    np.save(tmp, feats.features)
    os.replace(tmp, job.features)
    state, warnings = engine.prepare(inputs)
    for w in warnings:
        events.warn(w)
    result.warnings.extend(warnings)
    manifest: dict[str, Any] = {
        "manifest_version": 1,
        "key": key,
        "created": now(),
        "output": str(result.output),
        "inputs": digests,
        "preset": {"name": resolved.name, "origin": resolved.origin,
                   "values": resolved.preset.to_dict()},
        "audio": {"duration_s": feats.duration_s, "silent": feats.silent},
        "face": list(inputs.face) if inputs.face else None,
        "plan": plan.to_dict(),
        "engine_state": state,
        "warnings": warnings,
        "parts": [{"index": b.index, "state": "pending", "pid": None, "attempts": 0,
                   "seconds": None, "error": None, "failure": None} for b in plan.batches],
    }
    job.save(manifest)
    return manifest


def _with_frames(telemetry: dict[str, Any], frames: int) -> dict[str, Any]:
    t = Telemetry.from_dict(telemetry)
    t.frames = frames
    return t.to_dict()


def _manifest_hooks(job: JobDir, manifest: dict[str, Any], bar: Any) -> Hooks:
    parts = manifest["parts"]
    frames = [b["frame_end"] - b["frame_start"] for b in manifest["plan"]["batches"]]

    def started(index: int, pid: int) -> None:
        parts[index].update(state="running", pid=pid, started=now(),
                            attempts=parts[index].get("attempts", 0) + 1)
        job.save(manifest)

    def finished(r: BatchResult) -> None:
        # The verified part's content hash: what a resume checks before reusing it.
        parts[r.index].update(state="done", pid=None, finished=now(), rung=r.rung,
                              sha256=part_digest(job.part(r.index)),
                              seconds=round(r.seconds, 3), error=None, failure=None,
                              telemetry=_with_frames(r.telemetry, frames[r.index]))
        if r.worker:  # which resident worker rendered it, and whether it paid the load
            parts[r.index]["worker"] = r.worker
        job.save(manifest)

    def failed(index: int, kind: str, message: str, telemetry: dict[str, Any]) -> None:
        parts[index].update(state="failed", pid=None, finished=now(), failure=kind,
                            error=message.splitlines()[0], telemetry=telemetry)
        job.save(manifest)

    return Hooks(started=started, progress=lambda index, n: bar.update(n), finished=finished,
                 failed=failed)


def _views(plan: Plan, engine: Engine, inputs: JobInputs, job: JobDir,
           manifest: dict[str, Any], slots: list[dict[str, str]]) -> list[BatchView]:
    parts = manifest.get("parts") or [{"state": "planned"}] * len(plan.batches)
    state = manifest.get("engine_state") or {}
    views = []
    overlap = engines.seam_overlap(engine.preset)
    for b in plan.batches:
        # Batches take slots in turn when they run concurrently; an overlap starts them earlier.
        task = PartTask(inputs=inputs, batch=render_range(plan, b.index, overlap),
                        out=job.part(b.index), engine_state=state,
                        env=slots[b.index % len(slots)])
        views.append(BatchView(b.index, b.frame_start, b.frame_end, b.start_s(plan.fps),
                               b.end_s(plan.fps), b.clips, parts[b.index]["state"],
                               engine.describe(task), parts[b.index].get("rung") or 0,
                               parts[b.index].get("telemetry") or {}))
    return views
