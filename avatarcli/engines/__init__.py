"""The one registry of engines: the built-in ones, then any installed package's.

A third-party engine is a subclass of `avatarcli.engines.base.Engine` that an installed
package names under the entry-point group `avatarcli.engines`, e.g. in its pyproject.toml:

    [project.entry-points."avatarcli.engines"]
    myengine = "mypackage.engine:MyEngine"

Its `options` dataclass becomes the preset section of that name, and batch processes find it
the same way, so nothing in avatarcli changes. Engine modules keep their heavy imports (torch,
cv2) inside their methods: the registry imports every engine class to know its section.
"""

from __future__ import annotations

import functools
import importlib
import logging
from importlib import metadata

from avatarcli.engines.base import Engine
from avatarcli.errors import InputError
from avatarcli.options import SEAM_OVERLAP_AUTO, Preset

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "avatarcli.engines"
BUILT_IN = {
    "builtin": "avatarcli.engines.builtin.engine:BuiltinEngine",
    "liveavatar": "avatarcli.engines.liveavatar.engine:LiveAvatarEngine",
    "command": "avatarcli.engines.command:CommandEngine",
}


@functools.cache
def _targets() -> dict[str, str]:
    """Engine name -> "module:Class", built-ins first; a plugin cannot replace a built-in."""
    found = dict(BUILT_IN)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            log.warning("engine %r of %s ignored: the name is taken", ep.name, ep.value)
            continue
        found[ep.name] = ep.value
    return found


def names() -> list[str]:
    return list(_targets())


@functools.cache
def engine_class(name: str) -> type[Engine]:
    target = _targets().get(name)
    if target is None:
        raise InputError(f"engine '{name}' is not available (available: {', '.join(names())}; "
                         f"others install as packages with an '{ENTRY_POINT_GROUP}' entry point)")
    module, _, attr = target.partition(":")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"engine '{name}' ({target}) cannot be loaded: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, Engine)):
        raise InputError(f"engine '{name}' ({target}) is not an avatarcli Engine class")
    return found


@functools.cache
def sections() -> dict[str, type]:
    """Preset sections by engine name: each engine's `options` dataclass. An engine that
    cannot be loaded is left out, said once (its name still fails clearly when a preset
    uses it). Callers must not change the mapping."""
    out: dict[str, type] = {}
    for name in names():
        try:
            options = engine_class(name).options
        except InputError as exc:
            log.warning("%s", exc)
            continue
        if options is not None:
            out[name] = options
    return out


def resident(preset: Preset) -> bool:
    """Whether this preset renders in resident workers (its model loaded once per worker)."""
    return preset.worker.max_batches > 1 and engine_class(preset.engine).renders_resident(preset)


def seam_overlap(preset: Preset) -> int:
    """`seam_overlap` with auto resolved: SEAM_OVERLAP_AUTO for an engine that restarts at
    every batch, else 0."""
    if preset.seam_overlap >= 0:
        return preset.seam_overlap
    return SEAM_OVERLAP_AUTO if engine_class(preset.engine).restarts else 0


def timeout_s(preset: Preset, frames: int) -> float:
    """Seconds a batch of `frames` frames may run: the preset's batch_timeout_s, else what
    the engine expects (Engine.timeout_s)."""
    if preset.batch_timeout_s > 0:
        return preset.batch_timeout_s
    return engine_class(preset.engine).timeout_s(preset, frames)


def create(preset: Preset) -> Engine:
    """The engine a preset names."""
    return engine_class(preset.engine)(preset)
