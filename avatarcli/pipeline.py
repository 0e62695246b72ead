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

from avatarcli import analysis, engines, history, media, portrait
from avatarcli.assemble import assemble
from avatarcli.check import seam_tag
from avatarcli.engines.base import Engine, JobInputs, PartTask
from avatarcli.errors import AvatarError, InputError
from avatarcli.ffmpeg import ffmpeg_exe
from avatarcli.job import JobDir, JobLock, file_digest, job_key, now
from avatarcli.options import NON_RENDERING_KEYS, RESTARTING_ENGINES, Preset
from avatarcli.plan import Plan, lead_frames, make_plan, render_range
from avatarcli.presets import ResolvedPreset, parse_size
from avatarcli.runner import BatchResult, Executor, Hooks, Runner
from avatarcli.telemetry import Telemetry, aggregate
from avatarcli.verify import is_whole

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
            "plan": [vars(b) for b in self.batches],
        }


def default_output(audio: Path) -> Path:
    out = audio.with_suffix(".mp4")
    return out.with_name(audio.stem + ".avatar.mp4") if out == audio else out


def _check_paths(audio: Path, image: Path, output: Path, *, force: bool,
                 dry_run: bool) -> list[str]:
    problems = []
    for what, path in (("audio", audio), ("image", image)):
        if not path.exists():
            problems.append(f"{path}: {what} file not found")
        elif not path.is_file():
            problems.append(f"{path}: {what} is not a file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{path}: {what} file is not readable")
    folder = output.parent
    if not folder.is_dir():
        problems.append(f"{output}: output folder {folder} does not exist")
    elif not os.access(folder, os.W_OK | os.X_OK):
        problems.append(f"{output}: output folder {folder} is not writable")
    elif output.is_dir():
        problems.append(f"{output}: output is a folder")
    elif output.exists() and not force and not dry_run:
        problems.append(f"{output}: output exists (use --force to overwrite)")
    if output.resolve() in (audio.resolve(), image.resolve()):
        problems.append(f"{output}: output would overwrite an input")
    return problems


def _check_audio(audio: Path) -> None:
    info = media.probe(audio)
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
             events: Events | None = None, executor: Executor | None = None) -> Result:
    """Render `audio` + `image` to `output` (default: the audio's path with .mp4).

    Resumes a matching job in `OUTPUT.parts/`; raises InputError for bad input (nothing is
    created), EngineError when a batch or the verification fails (the job can be resumed).
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
    try:
        ffmpeg_exe()
        have_ffmpeg = True
    except AvatarError as exc:
        problems.append(str(exc))
        have_ffmpeg = False
    if audio.is_file() and have_ffmpeg:
        try:
            _check_audio(audio)
        except InputError as exc:
            problems.append(str(exc))
    if image.is_file():
        try:
            rgb = portrait.load(image)
        except InputError as exc:
            problems.append(str(exc))
    inputs = None
    warnings: list[str] = []
    if rgb is not None:
        src_h, src_w = rgb.shape[:2]
        width, height = portrait.output_size(parse_size(preset.size), src_w / src_h,
                                             engine.size_multiple())
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
        result.seconds = time.monotonic() - started
        return result

    # 3-5. Under the job's lock: another live process rendering it makes this one stop.
    with JobLock(job):
        if output.exists() and not force:  # it may have appeared while we were checking
            raise InputError(f"{output}: output exists (use --force to overwrite)")
        _run_job(job, engine, resolved, inputs, plan, feats, rgb, slots, result, events,
                 force=force, executor=executor)
        if not keep_parts:
            job.remove()  # under the lock, so no other process starts on a half-removed job
    result.seconds = time.monotonic() - started
    return result


def _run_job(job: JobDir, engine: Engine, resolved: ResolvedPreset, inputs: JobInputs,
             plan: Plan, feats: analysis.AudioFeatures, rgb: np.ndarray,
             slots: list[dict[str, str]], result: Result, events: Events, *,
             force: bool, executor: Executor | None) -> None:
    """Resume or start the job, render what is missing, assemble and verify the output."""
    preset = resolved.preset
    digests = {"audio": file_digest(inputs.audio), "image": file_digest(inputs.image)}
    key = _key(digests, preset, inputs.face)
    manifest = _open_job(job, key, force=force)
    if manifest is None:
        manifest = _new_job(job, key, digests, resolved, plan, feats, rgb, inputs, engine,
                            events, result)
    else:
        result.warnings.extend(manifest.get("warnings", []))
        for w in manifest.get("warnings", []):
            events.warn(w)
    plan = Plan.from_dict(manifest["plan"])
    parts = manifest["parts"]

    overlap = preset.overlap_frames()
    reused = [p["index"] for p in parts if p["state"] == "done"
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
        runner = Runner(job.path, job.log, slots=slots, cooldown_s=preset.cooldown_s,
                        oom_rungs=len(preset.oom_retry), hooks=hooks, executor=executor)
        try:
            runner.run(pending)
        finally:
            with hooks.lock:
                for p in parts:
                    if p["state"] == "running":
                        p.update(state="pending", pid=None)
                job.save(manifest)

    # Join, mux the original audio once, verify, publish.
    assemble([job.part(b.index) for b in plan.batches], inputs.audio, result.output,
             leads=[lead_frames(plan.batches, b.index, overlap) for b in plan.batches],
             audio_s=feats.duration_s, frames=plan.frames, width=plan.width,
             height=plan.height, fps=plan.fps, tag=f"{TAG_PREFIX}{key}",
             seams=seam_tag([b.frame_start for b in plan.batches[1:]], overlap))
    manifest["finished"] = now()
    if preset.check and preset.engine in RESTARTING_ENGINES:
        manifest["check"] = _post_check(result, inputs.audio, events)
    job.save(manifest)
    result.batches = _views(plan, engine, inputs, job, manifest, slots)
    result.telemetry = aggregate(p.get("telemetry") for p in parts)
    history.record(preset, result.telemetry)


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
    rendering = {k: v for k, v in preset.to_dict().items() if k not in NON_RENDERING_KEYS}
    rendering["face"] = list(face) if face else None
    return job_key(digests, rendering)


def output_is_current(output: Path, audio: Path, image: Path, preset: Preset) -> bool:
    """Whether `output` is a whole video that this tool made from these inputs and settings
    (its metadata carries the job key), so a batch rerun may skip it."""
    if not output.is_file():
        return False
    try:
        info = media.probe(output)
    except AvatarError:
        return False
    if info.first("video") is None or info.first("audio") is None:
        return False
    digests = {"audio": file_digest(audio), "image": file_digest(image)}
    return info.tags.get("comment") == f"{TAG_PREFIX}{_key(digests, preset, None)}"


def _open_job(job: JobDir, key: str, *, force: bool) -> dict[str, Any] | None:
    """The existing manifest when it belongs to this job; None to start a new job."""
    if not job.exists():
        return None
    try:
        manifest = job.load()
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


def _new_job(job: JobDir, key: str, digests: dict[str, Any], resolved: ResolvedPreset,
             plan: Plan, feats: analysis.AudioFeatures, rgb: np.ndarray, inputs: JobInputs,
             engine: Engine, events: Events, result: Result) -> dict[str, Any]:
    from PIL import Image

    job.create()
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
        parts[r.index].update(state="done", pid=None, finished=now(), rung=r.rung,
                              seconds=round(r.seconds, 3), error=None, failure=None,
                              telemetry=_with_frames(r.telemetry, frames[r.index]))
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
    overlap = engine.preset.overlap_frames()
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
