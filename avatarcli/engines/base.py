"""The small interface every engine implements, and what a batch process hands it."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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

    def __init__(self, preset: Preset) -> None:
        self.preset = preset

    def size_multiple(self) -> int:
        """Output width/height are multiples of this."""
        return 16

    def frame_size(self, area: tuple[int, int], src_w: int, src_h: int) -> tuple[int, int]:
        """(width, height) of the frames for a portrait of src_w x src_h and an area key."""
        from avatarcli import portrait

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
