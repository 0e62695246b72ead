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


def create(preset: Preset) -> Engine:
    """The engine a preset names."""
    target = _ENGINES.get(preset.engine)
    if target is None:
        raise InputError(f"engine '{preset.engine}' is not available in this version "
                         f"(available: {', '.join(_ENGINES)})")
    module, _, cls = target.partition(":")
    engine: Engine = getattr(importlib.import_module(module), cls)(preset)
    return engine
