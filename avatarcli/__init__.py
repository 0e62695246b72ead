"""avatarcli: speech + one portrait -> a verified talking-avatar video.

The Python API renders without the command line, resumably, exactly as `avatar gen` does:

    import avatarcli

    preset = avatarcli.load_preset("cpu-preview", {"size": "256*256"})
    result = avatarcli.generate("speech.wav", "portrait.png", preset, output="talk.mp4")
    print(result.output, result.frames, result.seconds)

`generate` also takes a preset name or YAML file, and `options=avatarcli.GenerateOptions(...)`
(or its fields as keywords: jobs, gpus, dry_run, force, keep_parts). Errors are
`avatarcli.errors.AvatarError` subclasses whose `exit_code` is what the CLI exits with.
Names load on first use, so importing avatarcli stays cheap for its batch processes.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "generate": "avatarcli.pipeline",
    "GenerateOptions": "avatarcli.pipeline",
    "Result": "avatarcli.pipeline",
    "Events": "avatarcli.pipeline",
    "load_preset": "avatarcli.presets",
}
__all__ = ["Events", "GenerateOptions", "Result", "__version__", "generate", "load_preset"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'avatarcli' has no attribute {name!r}")
    attr = "resolve" if name == "load_preset" else name
    return getattr(importlib.import_module(module), attr)
