"""Engines by name. Imports are lazy so the parent never loads an engine's heavy modules."""

from __future__ import annotations

import importlib

from avatarcli.engines.base import Engine
from avatarcli.errors import InputError
from avatarcli.options import Preset

_ENGINES = {
    "builtin": "avatarcli.engines.builtin.engine:BuiltinEngine",
    "liveavatar": "avatarcli.engines.liveavatar:LiveAvatarEngine",
    "command": "avatarcli.engines.command:CommandEngine",
}


def engine_class(name: str) -> type[Engine]:
    target = _ENGINES.get(name)
    if target is None:
        raise InputError(f"engine '{name}' is not available in this version "
                         f"(available: {', '.join(_ENGINES)})")
    module, _, cls = target.partition(":")
    found: type[Engine] = getattr(importlib.import_module(module), cls)
    return found


def resident(preset: Preset) -> bool:
    """Whether this preset renders in resident workers (its model loaded once per worker)."""
    return preset.worker.max_batches > 1 and engine_class(preset.engine).renders_resident(preset)


def create(preset: Preset) -> Engine:
    """The engine a preset names."""
    return engine_class(preset.engine)(preset)
