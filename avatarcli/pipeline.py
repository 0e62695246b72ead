"""`generate`: speech + portrait -> verified MP4. The core API the CLI calls; it never prints.

Three steps, each returning what the next needs: `prepare` (every input checked, the audio
analysed and planned; nothing written), `render_parts` (the job record opened or started, one
process per missing batch) and `finish` (assembly with the original audio, verification,
publication, the post-render check). `generate` runs them under the job's lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from avatarcli.inputs import (
    analyse_and_plan,
    check_audio,
    default_output,
    frame_size,
    path_problem,
    path_problems,
)
from avatarcli.job import JobDir, JobLock, Manifest, file_digest, job_key, now, part_digest
from avatarcli.media import portrait, streams
from avatarcli.media.assemble import AudioEncode, assemble
from avatarcli.media.ffmpeg_bin import ffmpeg_exe
from avatarcli.media.verify import is_whole
from avatarcli.options import Preset, rendering_values
from avatarcli.plan import Plan, lead_frames, render_range
from avatarcli.presets import ResolvedPreset
from avatarcli.resident import ResidentPool
from avatarcli.runner import BatchResult, Executor, Hooks, Resident, Runner
from avatarcli.telemetry import Telemetry, aggregate

log = logging.getLogger(__name__)
TAG_PREFIX = "avatarcli job "  # the output's comment tag: which job made it


@dataclass(frozen=True)
class GenerateOptions:
    """How a job runs (what it renders is the preset's business): one object for `gen`,
    each row of `batch`, and the Python API."""

    jobs: int = 1  # batch processes at once
    gpus: str | None = None  # GPU ids for model engines (--gpus), None: all visible
    dry_run: bool = False  # plan only; render nothing
    force: bool = False  # overwrite the output; discard a mismatching or damaged job
    keep_parts: bool = False  # keep the job folder after success


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


@dataclass
class Prepared:
    """A job checked and planned; nothing written yet."""

    resolved: ResolvedPreset
    engine: Engine
    output: Path
    job: JobDir
    inputs: JobInputs
    rgb: np.ndarray  # the portrait as loaded (EXIF-rotated RGB)
    feats: analysis.AudioFeatures
    plan: Plan
    slots: list[dict[str, str]]  # environment of each batch process that may run at once
    warnings: list[str]
    audio_encode: AudioEncode | None = None  # the audio's AAC, encoded while parts render

    @property
    def preset(self) -> Preset:
        return self.resolved.preset


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


def generate(audio: Path | str, image: Path | str, preset: ResolvedPreset | str | None = None,
             *, output: Path | str | None = None, face: tuple[int, int, int, int] | None = None,
             options: GenerateOptions | None = None, events: Events | None = None,
             executor: Executor | None = None, pool: ResidentPool | None = None,
             **changes: Any) -> Result:
    """Render `audio` + `image` to `output` (default: the audio's path with .mp4).

    `preset`: a resolved preset, or a preset name or YAML file (default cpu-preview).
    `options` (or its fields as keyword arguments): how the job runs. Resumes a matching job
    in `OUTPUT.parts/`; raises InputError for bad input (nothing is created), EngineError
    when a batch or the verification fails (the job can be resumed). `pool`: resident
    workers shared with other jobs (`avatar batch`); by default a job whose engine renders in
    resident workers gets its own pool, closed at the end.
    """
    opts = dataclasses.replace(options or GenerateOptions(), **changes)
    events = events or Events()
    started = time.monotonic()
    resolved = preset if isinstance(preset, ResolvedPreset) else presets.resolve(preset)
    job = prepare(Path(audio), Path(image), resolved, output=Path(output) if output else None,
                  face=face, options=opts, executor=executor)
    for w in job.warnings:
        events.warn(w)
    if opts.dry_run:
        return _dry_run(job, executor, started)

    # Under the job's lock: another live process rendering it makes this one stop.
    use_pool = executor is None and engines.resident(job.preset)
    own_pool = use_pool and pool is None
    if own_pool:
        pool = ResidentPool()
    try:
        with JobLock(job.job):
            if job.output.exists() and not opts.force:  # it may have appeared meanwhile
                raise InputError(f"{job.output}: output exists (use --force to overwrite)")
            manifest, reused, rendered = render_parts(
                job, force=opts.force, events=events, executor=executor,
                pool=pool if use_pool else None)
            checked = finish(job, manifest, force=opts.force, events=events,
                             pool=pool if use_pool else None)
            if not opts.keep_parts:
                job.job.remove()  # under the lock: no other process starts on a half-removed job
    except OSError as exc:
        if exc.filename is None:  # a write through a library (an image, an array): say where
            exc.filename = str(job.job.path)
        raise
    finally:
        if job.audio_encode is not None:  # a failed or interrupted job
            job.audio_encode.cancel()
        if own_pool and pool is not None:
            pool.close()
    telemetry = aggregate(p.telemetry for p in manifest.parts)
    history.record(job.preset, telemetry)
    return Result(
        output=job.output, job_dir=job.job.path, duration_s=job.feats.duration_s,
        frames=job.plan.frames, width=job.plan.width, height=job.plan.height, fps=job.plan.fps,
        preset=resolved.name, engine=job.preset.engine,
        batches=_views(job, manifest), rendered=rendered, reused=reused,
        seconds=time.monotonic() - started,
        warnings=[*job.warnings, *manifest.warnings, *checked.warnings], telemetry=telemetry,
        workers=[{k: w[k] for k in ("id", "pid", "load_s", "render_s", "ended")}
                 | {"batches": len(w["batches"])} for w in manifest.workers] if use_pool else [],
        check=checked.figures)


def prepare(audio: Path, image: Path, resolved: ResolvedPreset, *, output: Path | None,
            face: tuple[int, int, int, int] | None, options: GenerateOptions,
            executor: Executor | None) -> Prepared:
    """Check every input, the ffmpeg binary and the engine's set-up (all problems reported
    together, as one InputError), then analyse the audio and plan the batches."""
    preset = resolved.preset
    output = (output or default_output(audio)).expanduser().absolute()
    audio, image = audio.expanduser().absolute(), image.expanduser().absolute()
    if options.jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {options.jobs}")
    engine = engines.create(preset)
    job = JobDir.for_output(output)
    may_exist = options.force or options.dry_run
    problems = path_problems(audio, image, output, output_may_exist=may_exist)
    ffmpeg_exe()  # a missing or broken ffmpeg is this machine's problem: said first, alone
    if not path_problem(audio, "audio") and audio.is_file():
        try:
            check_audio(audio)
        except InputError as exc:
            problems.append(str(exc))
    rgb = None
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
        width, height = frame_size(engine, src_w, src_h)  # as `avatar plan --image` does
        out_face = portrait.map_box(face, src_w, src_h, width, height) if face else None
        inputs = JobInputs(audio=audio, image=image, job_dir=job.path, portrait=job.portrait,
                           features=job.features, width=width, height=height, fps=preset.fps,
                           face=out_face)
        engine_problems, warnings = engine.check(inputs)
        # A dry run still prints the commands, so engine set-up problems only warn there.
        (warnings if options.dry_run else problems).extend(engine_problems)
    if problems:
        raise InputError("\n".join(problems))
    assert rgb is not None and inputs is not None
    # A cluster decides which GPUs a batch gets; on this machine the engine shares them out.
    slots = ((executor.slots(options.jobs) if executor is not None else None)
             or engine.slots(options.jobs, options.gpus))
    feats, plan = analyse_and_plan(audio, preset, inputs.width, inputs.height)
    if feats.silent:
        warnings.append(f"{audio}: the audio is silence only; the mouth will stay closed")
    return Prepared(resolved, engine, output, job, inputs, rgb, feats, plan, slots, warnings)


def _dry_run(job: Prepared, executor: Executor | None, started: float) -> Result:
    workers = []
    if executor is None and engines.resident(job.preset):
        workers = planned_workers(len(job.plan.batches), len(job.slots),
                                  job.preset.worker.max_batches)
    return Result(output=job.output, job_dir=job.job.path, duration_s=job.feats.duration_s,
                  frames=job.plan.frames, width=job.plan.width, height=job.plan.height,
                  fps=job.plan.fps, preset=job.resolved.name, engine=job.preset.engine,
                  batches=_views(job, None), dry_run=True, warnings=job.warnings,
                  workers=workers, seconds=time.monotonic() - started)


def render_parts(job: Prepared, *, force: bool, events: Events, executor: Executor | None,
                 pool: ResidentPool | None) -> tuple[Manifest, list[int], list[int]]:
    """Resume or start the job record and render every part that is missing.
    Returns (the record, batches reused, batches rendered)."""
    preset = job.preset
    digests = {"audio": file_digest(job.inputs.audio), "image": file_digest(job.inputs.image)}
    key, legacy = _keys(digests, preset, job.inputs.face)
    manifest = (_open_job(job, (key, legacy), digests, force=force)
                or _new_job(job, key, digests))
    manifest.key = key  # a job of the earlier layout carries on under today's key
    for w in manifest.warnings:  # the engine's own (Engine.prepare), from the job's start
        events.warn(w)
    plan, records, store = manifest.plan, manifest.parts, job.job
    if not store.audio.is_file():  # a job made before the timeline was kept in it
        _decode_timeline(job)
    if not store.encoded_audio.is_file():
        job.audio_encode = AudioEncode(store.audio, store.encoded_audio)

    # A part is reused only if it is the very file that was verified (its content hash):
    # another valid video of the same length and size put in its place is rendered again.
    overlap = engines.seam_overlap(preset)
    reused = [p.index for p in records if p.state == "done"
              and part_digest(store.part(p.index)) == p.sha256
              and is_whole(store.part(p.index),
                           frames=render_range(plan, p.index, overlap).frames,
                           width=plan.width, height=plan.height, fps=plan.fps)]
    pending = [b.index for b in plan.batches if b.index not in reused]
    for i in pending:
        if records[i].state == "done":
            events.warn(f"{store.part(i)}: damaged or missing; rendering batch {i} again")
        records[i].mark_pending()
    store.save(manifest.to_dict())
    if reused:
        events.info(f"resuming {store.path}: {len(reused)} of {len(records)} parts already done")

    done_frames = sum(plan.batches[i].frames for i in reused)
    with events.progress(plan.frames, done_frames) as bar:
        hooks = _manifest_hooks(store, manifest, bar)
        resident = None
        if pool is not None:  # a model key per retry rung: a rung may need another model
            keys = [engines.create(presets.build(presets.rung_values(
                        {**preset.to_dict(), "oom_retry": []}, preset.oom_retry, k),
                        "oom_retry")).model_key() for k in range(len(preset.oom_retry) + 1)]
            resident = Resident(pool, keys, preset.worker)
        runner = Runner(store.path, store.log, slots=job.slots, cooldown_s=preset.cooldown_s,
                        oom_rungs=len(preset.oom_retry), hooks=hooks, executor=executor,
                        resident=resident,
                        timeout_s=lambda i: engines.timeout_s(preset, plan.batches[i].frames))
        try:
            runner.run(pending)
        finally:
            with hooks.lock:
                for p in records:
                    if p.state == "running":
                        p.mark_pending()
                store.save(manifest.to_dict())
    return manifest, reused, pending


@dataclass(frozen=True)
class Checked:
    """What the post-render check said: its figures (for `--json`) and warnings."""

    figures: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def finish(job: Prepared, manifest: Manifest, *, force: bool, events: Events,
           pool: ResidentPool | None) -> Checked:
    """Join the parts, mux the original audio once, verify, publish; then `avatar check` the
    output of an engine that restarts at every batch, and record it all in the job."""
    plan, store, preset = manifest.plan, job.job, job.preset
    overlap = engines.seam_overlap(preset)
    encoded = store.encoded_audio if store.encoded_audio.is_file() else None
    if job.audio_encode is not None:
        encoded, job.audio_encode = job.audio_encode.result(), None
    store.remove_temporaries()  # of an assembly killed in an earlier run
    assemble([store.part(b.index) for b in plan.batches], store.audio, job.output,
             leads=[lead_frames(plan.batches, b.index, overlap) for b in plan.batches],
             audio_s=job.feats.duration_s, frames=plan.frames, width=plan.width,
             height=plan.height, fps=plan.fps, tag=f"{TAG_PREFIX}{manifest.key}",
             work_dir=store.path, overwrite=force,
             seams=seam_tag([b.frame_start for b in plan.batches[1:]], overlap),
             encoded_audio=encoded)
    manifest.finished = now()
    if pool is not None:
        manifest.workers = pool.records(store.path)
    checked = Checked()
    if preset.check and engines.engine_class(preset.engine).restarts:
        checked, manifest.check = _post_check(job.output, job.inputs.audio, events)
    store.save(manifest.to_dict())
    return checked


def _post_check(output: Path, audio: Path, events: Events) -> tuple[Checked, dict[str, Any]]:
    """`avatar check` on the published output: (figures and warnings, the whole report)."""
    from avatarcli import check

    try:
        report = check.check(output, audio)
    except AvatarError as exc:
        message = f"{output}: could not be checked ({exc})"
        events.warn(message)
        return Checked(warnings=[message]), {}
    warnings = check.warnings(report)
    for w in warnings:
        events.warn(w)
    return Checked(check.quick_figures(report), warnings), report.to_dict()


def _key(digests: dict[str, Any], preset: Preset, face: tuple[int, int, int, int] | None,
         *, legacy: bool = False) -> str:
    rendering = rendering_values(preset.to_dict(), legacy=legacy)
    rendering["face"] = list(face) if face else None
    return job_key(digests, rendering)


def _keys(digests: dict[str, Any], preset: Preset,
          face: tuple[int, int, int, int] | None) -> tuple[str, str]:
    """(this job's key, the key the same job had before engines had their own sections):
    a job or output of the earlier layout is the same job, not another one."""
    return _key(digests, preset, face), _key(digests, preset, face, legacy=True)


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
    return info.tags.get("comment") in {f"{TAG_PREFIX}{k}" for k in _keys(digests, preset, None)}


def _open_job(job: Prepared, keys: tuple[str, ...], digests: dict[str, Any], *,
              force: bool) -> Manifest | None:
    """The existing record when it belongs to this job; None to start a new job.

    With `force`, a job record that cannot be used as it is (damaged, hand-edited, another
    job's) is always discarded: --force starts over whatever is in the folder."""
    store = job.job
    if not store.exists():
        return None
    try:
        data = store.load()
        if data["key"] in keys:
            _check_consistent(store, data, {
                "plan": job.plan.to_dict(), "face": list(job.inputs.face) if job.inputs.face
                else None, "inputs": {k: v["sha256"] for k, v in digests.items()},
                "values": rendering_values(job.preset.to_dict())})
    except InputError:
        if force:
            store.clear()
            return None
        raise
    if data["key"] in keys:
        return Manifest.from_dict(data)
    if not force:
        raise InputError(f"{store.path}: holds a job made from different inputs or settings; "
                         f"rerun with --force to discard it and start over")
    store.clear()
    return None


def _check_consistent(job: JobDir, data: dict[str, Any], expected: dict[str, Any]) -> None:
    """A record with this job's key must say what this job would say now (the plan, inputs,
    face and settings are all decided by the key); anything else was edited or damaged."""
    found = {"plan": data["plan"], "face": data.get("face"),
             "inputs": {k: v["sha256"] for k, v in data["inputs"].items()},
             "values": rendering_values(data["preset"]["values"])}
    for name, value in expected.items():
        if found[name] != value:
            raise InputError(f"{job.manifest_path}: job manifest is damaged ({name} differs "
                             f"from what its inputs and settings give); rerun with --force "
                             f"to start the job over")


def _decode_timeline(job: Prepared) -> None:
    """Decode the recording once into the job (`audio.wav`); slicing and muxing use only
    that file, so the length planned is the length muxed, on every run."""
    seconds = streams.decode_to_wav(job.inputs.audio, job.job.audio)
    if analysis.frame_count(seconds, job.plan.fps) != job.plan.frames:
        job.job.audio.unlink(missing_ok=True)
        raise InputError(f"{job.inputs.audio}: decodes to {job.feats.duration_s:.3f} s in one "
                         f"pass and {seconds:.3f} s in another; re-encode it (e.g. to WAV) and "
                         f"retry")


def _new_job(job: Prepared, key: str, digests: dict[str, Any]) -> Manifest:
    """Create the job folder with its prepared inputs (audio timeline, fitted portrait,
    features, the engine's state) and its record."""
    from PIL import Image

    store = job.job
    store.create()
    _decode_timeline(job)
    fitted = portrait.fit(job.rgb, job.plan.width, job.plan.height)
    tmp = store.portrait.with_suffix(".tmp.png")
    Image.fromarray(fitted).save(tmp, compress_level=1)  # 5x faster to write than level 6
    os.replace(tmp, store.portrait)
    tmp = store.features.with_suffix(".tmp.npy")
    np.save(tmp, job.feats.features)
    os.replace(tmp, store.features)
    state, warnings = job.engine.prepare(job.inputs)
    manifest = Manifest.new(
        key=key, output=job.output, inputs=digests,
        preset={"name": job.resolved.name, "origin": job.resolved.origin,
                "values": job.preset.to_dict()},
        audio={"duration_s": job.feats.duration_s, "silent": job.feats.silent},
        plan=job.plan, face=job.inputs.face, engine_state=state, warnings=warnings)
    store.save(manifest.to_dict())
    return manifest


def _with_frames(telemetry: dict[str, Any], frames: int) -> dict[str, Any]:
    t = Telemetry.from_dict(telemetry)
    t.frames = frames
    return t.to_dict()


def _manifest_hooks(store: JobDir, manifest: Manifest, bar: Any) -> Hooks:
    parts = manifest.parts
    frames = [b.frames for b in manifest.plan.batches]

    def save() -> None:
        store.save(manifest.to_dict())

    def started(index: int, pid: int) -> None:
        parts[index].mark_running(pid)
        save()

    def finished(r: BatchResult) -> None:
        # The verified part's content hash: what a resume checks before reusing it.
        parts[r.index].mark_done(sha256=part_digest(store.part(r.index)), seconds=r.seconds,
                                 rung=r.rung, telemetry=_with_frames(r.telemetry,
                                                                     frames[r.index]),
                                 worker=r.worker)
        save()

    def failed(index: int, kind: str, message: str, telemetry: dict[str, Any]) -> None:
        parts[index].mark_failed(kind, message, telemetry)
        save()

    return Hooks(started=started, progress=lambda index, n: bar.update(n), finished=finished,
                 failed=failed)


def _views(job: Prepared, manifest: Manifest | None) -> list[BatchView]:
    plan = job.plan
    state = manifest.engine_state if manifest is not None else {}
    overlap = engines.seam_overlap(job.preset)
    views = []
    for b in plan.batches:
        part = manifest.parts[b.index] if manifest is not None else None
        # Batches take slots in turn when they run concurrently; an overlap starts them earlier.
        task = PartTask(inputs=job.inputs, batch=render_range(plan, b.index, overlap),
                        out=job.job.part(b.index), engine_state=state,
                        env=job.slots[b.index % len(job.slots)])
        views.append(BatchView(b.index, b.frame_start, b.frame_end, b.start_s(plan.fps),
                               b.end_s(plan.fps), b.clips,
                               part.state if part else "planned", job.engine.describe(task),
                               part.rung if part else 0, part.telemetry if part else {}))
    return views
