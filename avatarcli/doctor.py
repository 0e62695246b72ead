"""`avatar doctor`: is this machine ready to render, and if not, what to do about it.

Each check says ok, warn (works, with a caveat) or fail (will not work) and, when not ok, a
fix. Nothing here raises on a missing tool: torch, NVML and nvidia-smi are all optional.
Units: GB = GiB (2**30 bytes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from avatarcli import gpus
from avatarcli.errors import ExitStatus
from avatarcli.media import ffmpeg_bin
from avatarcli.options import Preset

log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail")
REQUIRED_ENCODERS = ("libx264", "aac")  # parts are encoded with libx264, the output's audio aac
DISK_WARN_GB = 5.0
DISK_FAIL_GB = 1.0
CPU_HINT = "the built-in CPU engine works without one: use the cpu-preview preset (-p cpu-preview)"
_GIB = 2**30


@dataclass(frozen=True)
class Check:
    """One finding. `fix` says what to do; "" when the check is ok."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def run_checks(*, preset: Preset | None = None, jobs_dir: Path) -> list[Check]:
    """All checks, in a stable order. A `preset` adds its engine's GPU needs and set-up checks."""
    checks: list[Check] = []
    checks += _guard("ffmpeg", check_ffmpeg)
    checks += _guard("torch", check_torch)
    checks += _guard("gpu", lambda: check_gpus(preset))
    if preset is not None:
        checks += _guard(preset.engine, lambda: check_engine(preset))
    checks += _guard("disk", lambda: check_disk(jobs_dir))
    return checks


def exit_code(checks: Sequence[Check]) -> int:
    """1 if any check failed, else 0 (warnings do not fail)."""
    return ExitStatus.FAILED if any(c.status == "fail" for c in checks) else ExitStatus.OK


def to_json(checks: Sequence[Check]) -> str:
    return json.dumps({"ok": exit_code(checks) == 0, "checks": [asdict(c) for c in checks]},
                      indent=2)


def from_json(text: str) -> list[Check]:
    return [Check(**item) for item in json.loads(text)["checks"]]


def format_text(checks: Sequence[Check]) -> str:
    """Human-readable lines: status, name, detail, and the fix under it."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)


def _guard(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """Run one check; a bug or surprise in it becomes a warning instead of a crash."""
    try:
        return fn()
    except Exception as exc:
        log.debug("check %s crashed", name, exc_info=True)
        return [Check(name, "warn", f"could not check: {type(exc).__name__}: {exc}",
                      "run with -v and report this")]


# -- ffmpeg ----------------------------------------------------------------------------------


def check_ffmpeg() -> list[Check]:
    try:
        exe = ffmpeg_bin.ffmpeg_exe()
    except Exception as exc:  # InputError with the ways to get one
        return [Check("ffmpeg", "fail", str(exc),
                      "install ffmpeg (apt install ffmpeg), set FFMPEG_BINARY, or "
                      "pip install imageio-ffmpeg")]
    found = ffmpeg_bin.encoders()
    missing = [e for e in REQUIRED_ENCODERS if e not in found]
    detail = f"{exe} (version {ffmpeg_bin.version()})"
    if missing:
        return [Check("ffmpeg", "fail", f"{detail}: encoders missing: {', '.join(missing)}",
                      "use an ffmpeg built with libx264 and aac (FFMPEG_BINARY=/path/to/ffmpeg, "
                      "or unset it to use imageio-ffmpeg's)")]
    return [Check("ffmpeg", "ok", f"{detail}, encoders {' and '.join(REQUIRED_ENCODERS)}")]


# -- torch and GPUs --------------------------------------------------------------------------


def check_torch() -> list[Check]:
    build = gpus.torch_build()
    if build is None:
        return [Check("torch", "warn", "not installed (or fails to import) in this environment",
                      "nothing to do for the built-in engine; model engines run in their own "
                      "environment (e.g. liveavatar.torchrun)")]
    return [Check("torch", "ok", f"{build.version}, {build.kind}")]


def check_gpus(preset: Preset | None = None) -> list[Check]:
    """One check per GPU; with a preset whose engine needs GPUs (Engine.resources), also
    whether there are enough per launch and whether each has the compute capability it needs."""
    from avatarcli import engines

    need = engines.engine_class(preset.engine).resources(preset) if preset else None
    found = gpus.facts()
    if not found:
        if need is not None and need.gpus:
            assert preset is not None
            return [Check("gpu", "fail", "no GPU found (NVML, torch.cuda, nvidia-smi): "
                          f"the {preset.engine} engine needs CUDA GPUs", CPU_HINT)]
        return [Check("gpu", "warn", "no GPU found (NVML, torch.cuda, nvidia-smi)", CPU_HINT)]
    out = []
    for g in found:
        fp8 = gpus.fp8_capable(g.compute_capability)
        cc = ("compute n/a" if g.compute_capability is None
              else "compute {}.{}".format(*g.compute_capability))
        detail = (f"{g.name}, {_gb(g.total_gb)} total, {_gb(g.free_gb)} free, {cc}, "
                  f"fp8 {'yes' if fp8 else 'no'} ({g.source})")
        low = (need is not None and need.min_compute is not None
               and g.compute_capability is not None and g.compute_capability < need.min_compute)
        if low:
            assert need is not None and need.min_compute is not None
            out.append(Check(f"gpu {g.index}", "warn", detail + f": {need.min_compute_why}, "
                             "which needs compute capability {}.{}+".format(*need.min_compute),
                             need.min_compute_fix))
        else:
            out.append(Check(f"gpu {g.index}", "ok", detail))
    if need is not None and need.gpus:
        have = len(gpus.visible()) or len(found)
        if have < need.gpus:
            out.append(Check("gpus per launch", "fail", f"the preset needs {need.gpus} GPUs per "
                             f"launch; {have} visible", "use a preset with fewer GPUs per "
                             "launch or make more GPUs visible (CUDA_VISIBLE_DEVICES, --gpus)"))
    return out


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} GB"


# -- the preset's engine ----------------------------------------------------------------------


def check_engine(preset: Preset) -> list[Check]:
    """The engine's own set-up checks (Engine.doctor), each with the preset key that fixes it."""
    from avatarcli import engines

    return [Check(f.name or preset.engine, f.status, f.detail, f.fix)
            for f in engines.engine_class(preset.engine).doctor(preset)]


# -- disk ------------------------------------------------------------------------------------


def check_disk(jobs_dir: Path) -> list[Check]:
    """Free space (and write access) where jobs are written; the nearest existing parent
    stands in for a directory not created yet."""
    where = jobs_dir.expanduser().resolve()
    while not where.exists() and where != where.parent:
        where = where.parent
    free_gb = shutil.disk_usage(where).free / _GIB
    detail = f"{free_gb:.1f} GB free at {where}"
    if not os.access(where, os.W_OK):
        return [Check("disk", "fail", f"{detail}, not writable",
                      f"make {where} writable or write jobs elsewhere")]
    if free_gb < DISK_FAIL_GB:
        return [Check("disk", "fail", detail, f"free space on {where} (under {DISK_FAIL_GB:g} GB)")]
    if free_gb < DISK_WARN_GB:
        return [Check("disk", "warn", detail, f"free space on {where}: long jobs keep parts and "
                      f"raw model output there (under {DISK_WARN_GB:g} GB)")]
    return [Check("disk", "ok", detail)]
