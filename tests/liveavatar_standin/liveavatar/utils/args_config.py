"""Stand-in of liveavatar/utils/args_config.py: parse_args_for_training_config reads the
training YAML into a dict (args_config.py:44-58)."""

from __future__ import annotations

from typing import Any


def parse_args_for_training_config(training_config_path: str | None) -> dict[str, Any]:
    if not training_config_path:
        return {}
    import yaml

    with open(training_config_path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return dict(data)
