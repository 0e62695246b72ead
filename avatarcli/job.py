"""The job directory `OUT.parts/`: manifest (JSON), prepared inputs, parts and per-batch logs.

Only the parent process writes the manifest, always atomically, so a crash at any moment
leaves either the old or the new manifest, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avatarcli import __version__
from avatarcli.errors import InputError
from avatarcli.plan import Plan, render_range

if TYPE_CHECKING:
    from avatarcli.engines.base import PartTask

MANIFEST_VERSION = 1
PART_STATES = ("pending", "running", "done", "failed")


def file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": h.hexdigest()}


def part_digest(path: Path) -> str | None:
    """SHA-256 of a part's bytes; None when it cannot be read (then it is rendered again)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def job_key(inputs: dict[str, Any], rendering: dict[str, Any]) -> str:
    """What decides every pixel: input contents, rendering settings, and this tool's version."""
    payload = {
        "version": __version__,
        "inputs": {k: v["sha256"] for k, v in sorted(inputs.items())},
        "rendering": rendering,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# Bounds of a job record: far beyond any real job, small enough that nothing overflows.
MAX_FRAMES = 100_000_000  # about 46 days at 25 fps
MAX_SIDE = 16_384
MAX_FPS = 240
MAX_COUNT = 1_000_000  # attempts, clips, rung numbers and the like


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_num(v: Any, lo: float, hi: float) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi


def _is_digest(v: Any) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("path"), str)
            and _is_int(v.get("size"), 0, 1 << 62) and isinstance(v.get("sha256"), str)
            and len(v["sha256"]) == 64)


def _opt(v: Any, check: Any) -> bool:
    return v is None or check(v)


def _plan_problem(plan: Any) -> str | None:
    if not isinstance(plan, dict) or set(plan) != {"fps", "frames", "width", "height",
                                                     "infer_frames", "batches"}:
        return "plan: not a plan"
    for key, lo, hi in (("fps", 1, MAX_FPS), ("frames", 1, MAX_FRAMES), ("width", 16, MAX_SIDE),
                        ("height", 16, MAX_SIDE), ("infer_frames", 1, MAX_COUNT)):
        if not _is_int(plan[key], lo, hi):
            return f"plan.{key}: {plan[key]!r:.40} is not an integer in [{lo}, {hi}]"
    batches = plan["batches"]
    if not isinstance(batches, list) or not 1 <= len(batches) <= plan["frames"]:
        return "plan.batches: not a list of batches"
    pos = 0
    for i, b in enumerate(batches):
        if not (isinstance(b, dict) and set(b) == {"index", "frame_start", "frame_end", "clips"}
                and b["index"] == i and _is_int(b["index"], 0, MAX_FRAMES)
                and b["frame_start"] == pos and _is_int(b["frame_end"], pos + 1, plan["frames"])
                and _is_int(b["clips"], 1, MAX_COUNT)):
            return f"plan.batches[{i}]: not the batch that follows frame {pos}"
        pos = b["frame_end"]
    if pos != plan["frames"]:
        return f"plan.batches: cover {pos} of {plan['frames']} frames"
    return None


def _part_problem(i: int, p: Any) -> str | None:
    ok = (isinstance(p, dict) and p.get("index") == i and _is_int(p.get("index"), 0, MAX_FRAMES)
          and p.get("state") in PART_STATES
          and _opt(p.get("pid"), lambda v: _is_int(v, 0, 1 << 31))
          and _is_int(p.get("attempts", 0), 0, MAX_COUNT)
          and _is_int(p.get("rung") or 0, 0, MAX_COUNT)
          and _opt(p.get("seconds"), lambda v: _is_num(v, 0, 1e9))
          and _opt(p.get("error"), lambda v: isinstance(v, str))
          and _opt(p.get("failure"), lambda v: isinstance(v, str))
          and _opt(p.get("sha256"), lambda v: isinstance(v, str) and len(v) == 64)
          and _telemetry_ok(p.get("telemetry") or {}))
    return None if ok else f"parts[{i}]: not a part record"


def _telemetry_ok(value: Any) -> bool:
    from avatarcli.telemetry import Telemetry

    if not isinstance(value, dict):
        return False
    try:
        t = Telemetry.from_dict(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return False
    numbers = [t.wall_s, t.peak_rss_mb or 0.0, t.started_at or 0.0, *t.peak_gpu_mb.values()]
    return all(math.isfinite(x) and x >= 0 for x in numbers) and 0 <= t.frames <= MAX_FRAMES


def manifest_problem(data: Any) -> str | None:
    """What is wrong with a job record (the first problem), or None when it is usable."""
    if not isinstance(data, dict):
        return "not a mapping"
    if data.get("manifest_version") != MANIFEST_VERSION:
        return f"manifest_version: {data.get('manifest_version')!r:.40}"
    if not (isinstance(data.get("key"), str) and len(data["key"]) == 16):
        return "key: not a job key"
    inputs = data.get("inputs")
    if not (isinstance(inputs, dict) and _is_digest(inputs.get("audio"))
            and _is_digest(inputs.get("image"))):
        return "inputs: not the digests of an audio and an image file"
    preset = data.get("preset")
    if not (isinstance(preset, dict) and isinstance(preset.get("values"), dict)):
        return "preset: no values"
    audio = data.get("audio")
    if not (isinstance(audio, dict) and _is_num(audio.get("duration_s"), 0, MAX_FRAMES)
            and isinstance(audio.get("silent"), bool)):
        return "audio: not a duration and a silent flag"
    face = data.get("face")
    if not _opt(face, lambda v: isinstance(v, list) and len(v) == 4
                and all(_is_int(x, -MAX_SIDE, 1 << 20) for x in v)):
        return f"face: {face!r:.40} is not a box"
    if not isinstance(data.get("engine_state", {}), dict):
        return "engine_state: not a mapping"
    if not (isinstance(data.get("warnings", []), list)
            and all(isinstance(w, str) for w in data.get("warnings", []))):
        return "warnings: not a list of strings"
    problem = _plan_problem(data.get("plan"))
    if problem:
        return problem
    parts = data.get("parts")
    if not isinstance(parts, list) or len(parts) != len(data["plan"]["batches"]):
        return "parts: not one record per batch of the plan"
    for i, p in enumerate(parts):
        problem = _part_problem(i, p)
        if problem:
            return problem
    return None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class JobDir:
    path: Path

    @classmethod
    def for_output(cls, output: Path) -> JobDir:
        return cls(output.with_name(output.name + ".parts"))

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def portrait(self) -> Path:
        return self.path / "portrait.png"

    @property
    def features(self) -> Path:
        return self.path / "features.npy"

    def part(self, index: int) -> Path:
        return self.path / "parts" / f"part-{index:04d}.mp4"

    def temp_part(self, index: int) -> Path:
        # One name per attempt: a stale attempt (say, on a node cut off from its cluster)
        # can never rename another attempt's half-written file into place.
        return self.path / "parts" / f".part-{index:04d}.{os.getpid()}.tmp.mp4"

    @property
    def audio(self) -> Path:
        """The recording decoded once to PCM: the one timeline that slicing and muxing use."""
        return self.path / "audio.wav"

    @property
    def encoded_audio(self) -> Path:
        """The timeline encoded to AAC while the parts render (what the output muxes)."""
        return self.path / "audio.m4a"

    def remove_temporaries(self) -> None:
        """Temporary files of an assembly that was killed (they are as big as the video)."""
        for pattern in (".output.*.tmp.mp4", ".concat-*.txt", ".joined-*.mp4",
                        ".audio-encode.m4a"):
            for stale in self.path.glob(pattern):
                stale.unlink(missing_ok=True)

    def log(self, index: int) -> Path:
        return self.path / "logs" / f"batch-{index:04d}.log"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def create(self) -> None:
        for sub in ("parts", "logs"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def clear(self) -> None:
        """Remove everything but the lock file, which the caller holds."""
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name == "lock":
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def load(self) -> dict[str, Any]:
        """The manifest, checked field by field (types and bounds), so that a damaged or
        hand-edited one is refused clearly instead of failing later, on every rerun."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.manifest_path}: job manifest is damaged ({exc}); "
                             f"rerun with --force to start the job over") from exc
        problem = manifest_problem(data)
        if problem is not None:
            raise InputError(f"{self.manifest_path}: job manifest is damaged or from another "
                             f"version ({problem}); rerun with --force to start the job over")
        return data

    def save(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = now()
        write_json_atomic(self.manifest_path, manifest)


class JobLock:
    """An exclusive lock on a job, held for the life of one process (flock: released by the
    kernel when the holder dies, so a lock left by a dead process is simply taken over).

    The lock file records who holds it, to tell the next process.
    """

    def __init__(self, job: JobDir) -> None:
        self.path = job.path / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import socket

        from avatarcli.errors import BusyError

        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise BusyError(f"{self.path.parent}: busy, rendered by pid "
                                f"{holder.get('pid', '?')} on {holder.get('host', '?')} "
                                f"since {holder.get('since', '?')}") from None
            # The holder may have removed the job (and this file) between our open and lock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


# -- the job record, typed ----------------------------------------------------------------------


@dataclass
class PartRecord:
    """One batch's part in the job record: its state and what rendering it measured."""

    index: int
    state: str = "pending"  # one of PART_STATES
    pid: int | None = None
    attempts: int = 0
    seconds: float | None = None
    error: str | None = None
    failure: str | None = None  # "oom", "environment", "timeout", "crash", ...
    sha256: str | None = None  # of the verified part: what a resume checks before reusing it
    rung: int = 0  # the out-of-memory retry rung that rendered it
    started: str | None = None
    finished: str | None = None
    telemetry: dict[str, Any] = field(default_factory=dict)
    worker: dict[str, Any] = field(default_factory=dict)  # the resident worker that rendered it

    def mark_pending(self) -> None:
        self.state, self.pid = "pending", None

    def mark_running(self, pid: int) -> None:
        self.state, self.pid, self.started = "running", pid, now()
        self.attempts += 1

    def mark_done(self, *, sha256: str | None, seconds: float, rung: int,
                  telemetry: dict[str, Any], worker: dict[str, Any]) -> None:
        self.state, self.pid, self.finished = "done", None, now()
        self.sha256, self.seconds, self.rung = sha256, round(seconds, 3), rung
        self.error = self.failure = None
        self.telemetry = telemetry
        if worker:
            self.worker = worker

    def mark_failed(self, kind: str, message: str, telemetry: dict[str, Any]) -> None:
        self.state, self.pid, self.finished = "failed", None, now()
        self.failure, self.error = kind, (message.splitlines() or [""])[0]
        self.telemetry = telemetry

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.worker:
            del out["worker"]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PartRecord:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in d.items() if k in known}
        for key, empty in (("rung", 0), ("attempts", 0), ("telemetry", {}), ("worker", {})):
            data[key] = data.get(key) or empty
        return cls(**data)


@dataclass
class Manifest:
    """The job record (`manifest.json`): what the job renders and the state of every part.
    Only the parent process writes it (JobDir.save, atomically); a batch process reads its
    task from it (Manifest.task)."""

    key: str
    output: str
    inputs: dict[str, dict[str, Any]]  # "audio"/"image" -> file_digest()
    preset: dict[str, Any]  # name, origin, values (Preset.to_dict())
    audio: dict[str, Any]  # duration_s, silent
    plan: Plan
    parts: list[PartRecord]
    face: tuple[int, int, int, int] | None = None  # in output pixels
    engine_state: dict[str, Any] = field(default_factory=dict)  # Engine.prepare()
    warnings: list[str] = field(default_factory=list)
    created: str = field(default_factory=now)
    finished: str | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)  # resident workers' records
    check: dict[str, Any] = field(default_factory=dict)  # `avatar check` of the output

    @classmethod
    def new(cls, *, key: str, output: Path, inputs: dict[str, dict[str, Any]],
            preset: dict[str, Any], audio: dict[str, Any], plan: Plan,
            face: tuple[int, int, int, int] | None, engine_state: dict[str, Any],
            warnings: list[str]) -> Manifest:
        return cls(key=key, output=str(output), inputs=inputs, preset=preset, audio=audio,
                   plan=plan, parts=[PartRecord(b.index) for b in plan.batches], face=face,
                   engine_state=engine_state, warnings=list(warnings))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION, "key": self.key, "created": self.created,
            "output": self.output, "inputs": self.inputs,
            "preset": self.preset, "audio": self.audio,
            "face": list(self.face) if self.face else None, "plan": self.plan.to_dict(),
            "engine_state": self.engine_state, "warnings": self.warnings,
            "parts": [p.to_dict() for p in self.parts],
        }
        if self.finished is not None:
            out.update(finished=self.finished, workers=self.workers, check=self.check)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """From a record manifest_problem() found usable."""
        face = d.get("face")
        return cls(key=d["key"], output=d.get("output", ""), inputs=d["inputs"],
                   preset=d["preset"], audio=d["audio"], plan=Plan.from_dict(d["plan"]),
                   parts=[PartRecord.from_dict(p) for p in d["parts"]],
                   face=(face[0], face[1], face[2], face[3]) if face else None,
                   engine_state=d.get("engine_state") or {}, warnings=d.get("warnings") or [],
                   created=d.get("created", ""), finished=d.get("finished"),
                   workers=d.get("workers") or [], check=d.get("check") or {})

    def task(self, job: JobDir, index: int, *, overlap_frames: int = 0,
             env: dict[str, str] | None = None) -> PartTask:
        """Batch `index` as the task a batch process renders (to a temporary name); with a
        seam overlap it starts `overlap_frames` earlier (see plan.render_range)."""
        from avatarcli.engines.base import JobInputs, PartTask

        inputs = JobInputs(
            # The recording decoded once into the job: every part is cut from the same timeline.
            audio=job.audio if job.audio.is_file() else Path(self.inputs["audio"]["path"]),
            image=Path(self.inputs["image"]["path"]), job_dir=job.path,
            portrait=job.portrait, features=job.features, width=self.plan.width,
            height=self.plan.height, fps=self.plan.fps, face=self.face)
        return PartTask(inputs=inputs, batch=render_range(self.plan, index, overlap_frames),
                        out=job.temp_part(index), engine_state=self.engine_state,
                        env=env or {})
