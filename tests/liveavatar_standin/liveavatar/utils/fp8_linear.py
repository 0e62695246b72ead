"""Stand-in of liveavatar/utils/fp8_linear.py: replace_linear_with_scaled_fp8(model,
ignore_keys) swaps nn.Linear layers for fp8 ones. Here it only records that it ran."""

from __future__ import annotations

from typing import Any


def replace_linear_with_scaled_fp8(model: Any, ignore_keys: list[str] | None = None) -> None:
    model.fp8_converted = True
    model.fp8_ignore_keys = list(ignore_keys or [])
