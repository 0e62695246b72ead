"""Which GPUs are visible: the one place that asks the system (nvidia-smi) about them."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from avatarcli.errors import InputError

log = logging.getLogger(__name__)


def parse_list(value: str) -> list[str]:
    """`0,2,3` -> ["0", "2", "3"]; refuses empty items and duplicates."""
    ids = [v.strip() for v in value.split(",")]
    if not value.strip() or any(not v for v in ids) or len(set(ids)) != len(ids):
        raise InputError(f"--gpus {value!r}: expected a comma-separated list of GPU ids, e.g. 0,1")
    return ids


def visible(requested: str | None = None) -> list[str]:
    """GPU ids to use: --gpus, else CUDA_VISIBLE_DEVICES, else those nvidia-smi lists."""
    if requested:
        return parse_list(requested)
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [v for v in (x.strip() for x in env.split(",")) if v and v != "-1"]
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]
