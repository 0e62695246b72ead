"""The small interface every engine implements, and what a batch process hands it.

An engine is one class that declares everything the rest of avatarcli asks of it: its preset
section (`options`, a frozen dataclass), its validation rules, the resources one batch needs,
whether it takes a prompt, whether it restarts at every batch, its set-up checks for
`avatar doctor`, its expected speed (the default batch time limit) and, for a model kept
loaded, its resident-worker hooks. The registry (`avatarcli.engines`) is built from the
classes; nothing outside an engine's own folder names it.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from avatarcli import procs
from avatarcli.errors import EngineError, OutOfMemoryError
from avatarcli.options import Preset
from avatarcli.plan import Batch


@dataclass(frozen=True)
class JobInputs:
    """What every engine may read: the original inputs and the job's prepared files."""

    audio: Path  # the original recording
    image: Path  # the original portrait
    job_dir: Path
    portrait: Path  # the portrait fitted to the output size (PNG in the job dir)
    features: Path  # per-frame speech features (.npy in the job dir)
    width: int
    height: int
    fps: int
    face: tuple[int, int, int, int] | None = None  # user's --face X,Y,W,H in output pixels


@dataclass(frozen=True)
class PartTask:
    """One batch to render into `out` (a temporary name; the caller verifies and renames)."""

    inputs: JobInputs
    batch: Batch
    out: Path
    engine_state: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # per-slot environment (e.g. GPU ids)


Progress = Callable[[int], None]  # frames of this part rendered so far

# The default per-batch time limit of an engine that does not declare its speed (preset key
# batch_timeout_s = 0): a command template's model is unknown, so a fixed bound.
TIMEOUT_UNKNOWN_S = 6 * 3600.0


@dataclass(frozen=True)
class Resources:
    """What one batch asks of a machine (a Ray node): CPUs, and GPUs per run."""

    cpus: float = 1
    gpus: int = 0
    # The lowest CUDA compute capability a GPU needs for this preset, why, and the preset
    # change that lifts the need (`avatar doctor` warns about each GPU below it).
    min_compute: tuple[int, int] | None = None
    min_compute_why: str = ""
    min_compute_fix: str = ""


@dataclass(frozen=True)
class Finding:
    """One result of an engine's set-up check, for `avatar doctor`: `key` is the preset key
    to change ("" when the fix is not one key) and `fix` what to do."""

    status: Literal["ok", "warn", "fail"]
    detail: str
    key: str = ""
    fix: str = ""
    name: str = ""  # what is checked; "" for the engine's set-up itself


def run_model(cmd: list[str], *, cwd: Path | None, env: dict[str, str], label: str) -> None:
    """Run a model's command (output to the batch log); raise on failure, telling OOM apart."""
    outcome = procs.run_logged(cmd, cwd=cwd, env={**os.environ, **env})
    if outcome.returncode == 0:
        return
    if outcome.out_of_memory:
        raise OutOfMemoryError(f"{label}: out of memory (exit {outcome.returncode}): "
                               f"{outcome.oom_line}")
    raise EngineError(f"{label} exited with {outcome.returncode}")


class Engine(ABC):
    """Renders one part (a batch's frames, video only) per call, inside a fresh process."""

    name: ClassVar[str]
    # This engine's preset section (a frozen dataclass of knob() fields), or None.
    options: ClassVar[type | None] = None
    # `--prompt` goes to the `prompt` key of this engine's section.
    takes_prompt: ClassVar[bool] = False
    # Every batch starts afresh from the portrait (a model's state does not carry over from one
    # launch to the next): seams get an overlap, and `gen` checks the output.
    restarts: ClassVar[bool] = False
    # Expected speed, for the default batch time limit: a start-up allowance plus seconds per
    # frame far above what the engine needs, so only a hung batch reaches it. None: unknown.
    timeout_start_s: ClassVar[float | None] = None
    timeout_per_frame_s: ClassVar[float] = 0.0

    def __init__(self, preset: Preset) -> None:
        self.preset = preset

    # -- what the engine declares, from the preset alone (no instance needed) ---------------

    @classmethod
    def validate(cls, preset: Preset) -> list[str]:
        """Problems of a preset that uses this engine, beyond each knob's own bounds (rules that
        tie knobs together, values the model supports); each names the key to change."""
        return []

    @classmethod
    def resources(cls, preset: Preset) -> Resources:
        """What one batch of `preset` asks of a node (the Ray executor, `avatar doctor`)."""
        return Resources()

    @classmethod
    def timeout_s(cls, preset: Preset, frames: int) -> float:
        """The default time limit of a batch of `frames` frames (batch_timeout_s = 0)."""
        if cls.timeout_start_s is None:
            return TIMEOUT_UNKNOWN_S
        return cls.timeout_start_s + cls.timeout_per_frame_s * frames

    @classmethod
    def speed_key(cls, preset: Preset) -> dict[str, Any]:
        """This engine's settings that decide the speed and memory of a batch, beyond the
        common ones (size, clip length, steps): what the history of earlier jobs is keyed by."""
        return {}

    @classmethod
    def doctor(cls, preset: Preset) -> list[Finding]:
        """Set-up checks of this engine with this preset (installation, weights, this
        machine's GPUs and RAM), for `avatar doctor`."""
        return []

    @classmethod
    def renders_resident(cls, preset: Preset) -> bool:
        """Whether this engine, with this preset, keeps its model loaded across batches in a
        resident worker (then render() is called many times on one instance, and close() at
        the end). Engines that do not opt in get a fresh process per batch."""
        return False

    def model_key(self) -> str:
        """What identifies the loaded model: batches (and manifest rows) whose presets give the
        same key may share a resident worker. Default: the whole engine section."""
        return json.dumps(self.preset.to_dict().get(self.name, {}), sort_keys=True)

    def memory_report(self) -> dict[str, Any]:
        """After a batch in a resident worker: the model's own memory figures (e.g. GPU
        allocated/reserved per device), for the recycling decision."""
        return {}

    def close(self) -> None:  # noqa: B027  (optional hook: most engines hold nothing)
        """Release what render() kept loaded (a resident worker ends)."""

    def take_over(self, previous: Engine) -> bool:
        """In a resident worker, the next batch's engine may keep the model `previous` loaded
        (same model_key): take it and return True; False leaves `previous` to be closed."""
        return False

    def worker_facts(self) -> dict[str, Any]:
        """Facts of the last batch for the worker's record (e.g. {"load_s": 41.2} when it
        paid for loading the model)."""
        return {}

    def size_multiple(self) -> int:
        """Output width/height are multiples of this."""
        return 16

    def frame_size(self, area: tuple[int, int], src_w: int, src_h: int) -> tuple[int, int]:
        """(width, height) of the frames for a portrait of src_w x src_h and an area key."""
        from avatarcli.media import portrait

        return portrait.output_size(area, src_w / src_h, self.size_multiple())

    def check(self, inputs: JobInputs) -> tuple[list[str], list[str]]:
        """(problems, warnings) found before anything starts; problems stop a real run."""
        return [], []

    def slots(self, jobs: int, gpus: str | None) -> list[dict[str, str]]:
        """The environment of each batch process that may run at once (`gpus`: --gpus)."""
        return [{} for _ in range(jobs)]

    def prepare(self, inputs: JobInputs) -> tuple[dict[str, Any], list[str]]:
        """Once per job, in the parent: JSON-able state for every part, and warnings to show."""
        return {}, []

    def describe(self, task: PartTask) -> str | None:
        """The external command a batch runs, for --dry-run; None for in-process engines."""
        return None

    @abstractmethod
    def render(self, task: PartTask, progress: Progress) -> None:
        """Write exactly task.batch.frames frames at the job's size and fps to task.out."""
