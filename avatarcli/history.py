"""What earlier jobs measured, per GPU model and settings: `avatar plan` shows it beside its
estimate ("estimated vs seen") and turns the frame rate into a time estimate.

One JSON object per finished job, appended to $AVATARCLI_STATE_DIR/history.jsonl
($XDG_STATE_HOME/avatarcli by default). Losing or damaging the file loses only this advice.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from avatarcli.options import Preset

KEEP_LINES = 2000  # newest records kept when the file is rewritten


def path() -> Path:
    env = os.environ.get("AVATARCLI_STATE_DIR")
    if env:
        return Path(env).expanduser() / "history.jsonl"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "avatarcli" / "history.jsonl"


def settings_key(preset: Preset) -> dict[str, Any]:
    """The settings that decide speed and memory of a launch."""
    from avatarcli import engines

    return {"engine": preset.engine, "size": preset.size, "infer_frames": preset.infer_frames,
            "sample_steps": preset.sample_steps, "offload": preset.offload,
            "online_decode": preset.online_decode,
            **engines.engine_class(preset.engine).speed_key(preset)}


def record(preset: Preset, telemetry: dict[str, Any]) -> None:
    """Append one finished job's measurements; never fails the job."""
    if not telemetry or not telemetry.get("fps"):
        return
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gpu": telemetry.get("gpu_name"),
             "settings": settings_key(preset), "fps": telemetry.get("fps"),
             "peak_gpu_mb": telemetry.get("peak_gpu_mb") or {},
             "peak_rss_mb": telemetry.get("peak_rss_mb")}
    with contextlib.suppress(OSError):
        p = path()
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def seen(preset: Preset, gpu_name: str | None) -> dict[str, Any]:
    """Median frame rate and largest GPU peak of earlier jobs like this one on this GPU model."""
    key = settings_key(preset)
    rates, peaks = [], []
    with contextlib.suppress(OSError):
        for line in path().read_text(encoding="utf-8").splitlines()[-KEEP_LINES:]:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if not isinstance(e, dict) or e.get("settings") != key or e.get("gpu") != gpu_name:
                continue
            if e.get("fps"):
                rates.append(float(e["fps"]))
            peaks += [float(v) for v in (e.get("peak_gpu_mb") or {}).values()]
    if not rates:
        return {}
    return {"jobs": len(rates), "fps": round(statistics.median(rates), 2),
            "peak_gpu_gb": round(max(peaks) / 1024, 2) if peaks else None, "gpu": gpu_name}
