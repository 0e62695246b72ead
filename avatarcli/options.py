"""The settings a preset holds: the common knobs and the resident workers' section here, each
engine's own section beside its engine (`Engine.options`), defaults and bounds in one place.

A field's metadata says what values are valid; `presets.py` validates against it, so adding a
knob to a dataclass is all it takes to make it loadable, overridable with `--set` and shown by
`avatar presets show`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def knob(default: Any, *, bounds: tuple[float, float] | None = None,
         choices: tuple[Any, ...] | None = None, help: str = "") -> Any:
    """A dataclass field with its valid range or choices attached."""
    meta = {"bounds": bounds, "choices": choices, "help": help}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


SEAM_OVERLAP_AUTO = 8  # frames (0.32 s at 25 fps): boundaries sit in pauses, so this is short


@dataclass(frozen=True)
class WorkerOptions:
    """Resident model workers: one process loads the model once and renders batch after batch
    (engines that opt in: LiveAvatar on one GPU). It is replaced before its memory builds up."""

    # Batches one worker renders before it is replaced; 1 = a fresh process per batch.
    max_batches: int = knob(20, bounds=(1, 10000), help="batches per worker")
    # Replace the worker when its host RSS after a batch exceeds its RSS after the first by this.
    rss_growth_mb: float = knob(4096.0, bounds=(1.0, 1e7), help="host RSS growth bound (MiB)")
    # Replace it when its reserved GPU memory grows past this over its level after the first batch.
    gpu_growth_gb: float = knob(2.0, bounds=(0.01, 1e4), help="reserved GPU growth bound (GiB)")
    # Stop a worker that waited this long for its next batch (between rows of `avatar batch`).
    idle_s: float = knob(300.0, bounds=(0.0, 86400.0), help="idle seconds before it stops")


@dataclass(frozen=True)
class Preset:
    """A fully resolved preset. Field defaults are the values no preset overrides."""

    # Which engine renders the parts.
    engine: str = knob("builtin", help="rendering engine")
    # One line shown by `avatar presets`.
    description: str = knob("", help="one-line description")
    # Output AREA key "W*H": real width/height follow the portrait's aspect ratio within it.
    size: str = knob("512*512", help="area key W*H")
    # Output frame rate (LiveAvatar renders at 25).
    fps: int = knob(25, bounds=(1, 120), help="frames per second")
    # Frames per clip: the model's unit of generation.
    infer_frames: int = knob(48, bounds=(4, 240), help="frames per clip")
    # Diffusion sampling steps (model engines).
    sample_steps: int = knob(4, bounds=(1, 100), help="sampling steps")
    # Swap whole models between GPU and CPU (model engines).
    offload: bool = knob(False, help="offload models to CPU")
    # Decode latents while generating instead of at the end (model engines).
    online_decode: bool = knob(False, help="online VAE decode")
    # Clips per batch; each batch is one fresh process, which bounds memory.
    clips_per_batch: int = knob(25, bounds=(1, 10000), help="clips per batch process")
    # Pause between batches, e.g. to let a GPU cool or free memory.
    cooldown_s: float = knob(0.0, bounds=(0.0, 3600.0), help="seconds between batches")
    # Seconds one batch process may run before its process group is killed and the batch is
    # retried once (then the job fails, exit 3, resumable). 0: derived from the engine's
    # expected time per frame (Engine.timeout_s), so a hung model never blocks a cron job.
    batch_timeout_s: float = knob(0.0, bounds=(0.0, 7 * 86400.0), help="per-batch time limit")
    # Seed for everything random in the engine.
    seed: int = knob(420, bounds=(0, 2**31 - 1), help="random seed")
    # Lighter settings to retry a batch with after a CUDA out-of-memory failure, one rung at
    # a time, each adding to the ones before: e.g. [{liveavatar.offload_kv_cache: true},
    # {infer_frames: 24}]. Only the failing batch is retried.
    oom_retry: list[dict[str, Any]] = knob([], help="out-of-memory retry ladder")
    # Frames each batch after the first also renders before its boundary; assembly crossfades
    # them with the end of the previous part, so an engine that restarts at every batch does
    # not jump there. -1: auto (SEAM_OVERLAP_AUTO for engines that restart at every batch, else 0).
    seam_overlap: int = knob(-1, bounds=(-1, 240), help="frames crossfaded at each seam, -1 auto")
    # Run `avatar check` on each finished video of a model engine and keep its figures.
    check: bool = knob(True, help="check finished videos of model engines")
    # Each registered engine's own section by engine name (its `options` dataclass), made by
    # presets.build; `preset.section(Cls)` reads one with its type, `preset.NAME` untyped.
    sections: Mapping[str, Any] = field(default_factory=dict, metadata={"section": True})
    worker: WorkerOptions = field(default_factory=WorkerOptions)

    def section(self, cls: type[T]) -> T:
        """The section of type `cls` (its defaults when the preset has none)."""
        for value in self.sections.values():
            if isinstance(value, cls):
                return value
        return cls()

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"preset has no key or section {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every key, with each engine's section under its name (as in a preset file)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "sections":
                out.update({k: dataclasses.asdict(v) for k, v in self.sections.items()})
            else:
                value = getattr(self, f.name)
                out[f.name] = (dataclasses.asdict(value) if isinstance(value, WorkerOptions)
                               else copy.deepcopy(value))
        return out


# Top-level keys holding a section of their own (not an engine's).
CORE_SECTIONS: dict[str, type] = {"worker": WorkerOptions}

# Keys whose change does not change a single rendered pixel: a job survives them.
NON_RENDERING_KEYS = frozenset({"description", "cooldown_s", "batch_timeout_s", "worker",
                                "check"})
# Keys a retry rung may change: per-launch settings, never the plan or the output's identity.
RUNG_FORBIDDEN_KEYS = frozenset({"engine", "fps", "seed", "clips_per_batch", "oom_retry",
                                 "description", "cooldown_s", "seam_overlap", "check"})



def top_level_keys() -> list[str]:
    """The preset's own keys (not an engine's section)."""
    return [f.name for f in dataclasses.fields(Preset) if f.name != "sections"]


# Sections that were fixed fields of every preset before engines declared their own (0.1.0):
# a job or output made then was identified with all of them.
LEGACY_SECTIONS = ("builtin", "liveavatar", "command")


def rendering_values(values: dict[str, Any], *, legacy: bool = False) -> dict[str, Any]:
    """Of a preset's values (Preset.to_dict()), those that decide the rendered pixels: the
    common knobs and the section of the engine in use, without NON_RENDERING_KEYS. Another
    engine's section (an installed plugin's, say) never changes a job's identity.
    `legacy`: as identified before, with every built-in engine's section."""
    top = set(top_level_keys())
    out = {k: v for k, v in values.items() if k in top and k not in NON_RENDERING_KEYS}
    engine = values.get("engine")
    if isinstance(engine, str) and engine in values and engine not in top:
        out[engine] = values[engine]
    if legacy:
        out.update({k: values[k] for k in LEGACY_SECTIONS if k in values})
    return out
