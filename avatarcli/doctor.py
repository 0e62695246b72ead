"""`avatar doctor`: is this machine ready to render, and if not, what to do about it.

Each check says ok, warn (works, with a caveat) or fail (will not work) and, when not ok, a
fix. Nothing here raises on a missing tool: torch, NVML and nvidia-smi are all optional.
Units: GB = GiB (2**30 bytes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from avatarcli import gpus
from avatarcli.media import ffmpeg_bin
from avatarcli.options import Preset

log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail")
REQUIRED_ENCODERS = ("libx264", "aac")  # parts are encoded with libx264, the output's audio aac
DISK_WARN_GB = 5.0
DISK_FAIL_GB = 1.0
CPU_HINT = "the built-in CPU engine works without one: use the cpu-preview preset (-p cpu-preview)"
LIVEAVATAR_FIX = ("set liveavatar.repo, ckpt_dir, lora_path and torchrun in the preset, with "
                  "--set liveavatar.KEY=VALUE, or through $AVATARCLI_LIVEAVATAR_*")
_GIB = 2**30


@dataclass(frozen=True)
class Check:
    """One finding. `fix` says what to do; "" when the check is ok."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def run_checks(*, preset: Preset | None = None, jobs_dir: Path) -> list[Check]:
    """All checks, in a stable order. A LiveAvatar `preset` adds its set-up checks."""
    liveavatar = preset is not None and preset.engine == "liveavatar"
    checks: list[Check] = []
    checks += _guard("ffmpeg", check_ffmpeg)
    checks += _guard("torch", check_torch)
    checks += _guard("gpu", lambda: check_gpus(preset if liveavatar else None))
    if liveavatar:
        assert preset is not None
        checks += _guard("liveavatar", lambda: check_liveavatar(preset, jobs_dir))
    checks += _guard("disk", lambda: check_disk(jobs_dir))
    return checks


def exit_code(checks: Sequence[Check]) -> int:
    """1 if any check failed, else 0 (warnings do not fail)."""
    return 1 if any(c.status == "fail" for c in checks) else 0


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
                      "nothing to do for the built-in engine; GPU engines run in their own "
                      "environment (liveavatar.torchrun)")]
    return [Check("torch", "ok", f"{build.version}, {build.kind}")]


def check_gpus(liveavatar: Preset | None = None) -> list[Check]:
    """One check per GPU; with a LiveAvatar preset, also whether its GPUs and fp8 fit."""
    found = gpus.facts()
    if not found:
        if liveavatar is not None:
            return [Check("gpu", "fail", "no GPU found (NVML, torch.cuda, nvidia-smi): "
                          "LiveAvatar needs CUDA GPUs", CPU_HINT)]
        return [Check("gpu", "warn", "no GPU found (NVML, torch.cuda, nvidia-smi)", CPU_HINT)]
    want_fp8 = liveavatar is not None and liveavatar.liveavatar.fp8
    out = []
    for g in found:
        fp8 = gpus.fp8_capable(g.compute_capability)
        cc = ("compute n/a" if g.compute_capability is None
              else "compute {}.{}".format(*g.compute_capability))
        detail = (f"{g.name}, {_gb(g.total_gb)} total, {_gb(g.free_gb)} free, {cc}, "
                  f"fp8 {'yes' if fp8 else 'no'} ({g.source})")
        if want_fp8 and not fp8:
            out.append(Check(f"gpu {g.index}", "warn", detail + ": the preset uses fp8, which "
                             "needs compute capability 8.9+", "--set liveavatar.fp8=false"))
        else:
            out.append(Check(f"gpu {g.index}", "ok", detail))
    if liveavatar is not None:
        need = liveavatar.liveavatar.gpus_per_run
        have = len(gpus.visible()) or len(found)
        if have < need:
            out.append(Check("gpus per launch", "fail", f"the preset needs {need} GPUs per "
                             f"launch; {have} visible", "use a 1-GPU LiveAvatar preset or "
                             "make more GPUs visible (CUDA_VISIBLE_DEVICES, --gpus)"))
    return out


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} GB"


# -- LiveAvatar ------------------------------------------------------------------------------


def check_liveavatar(preset: Preset, jobs_dir: Path) -> list[Check]:
    """The engine's own pre-launch check, reported as checks."""
    from avatarcli import gpus, memory
    from avatarcli.engines.liveavatar import ENV_VARS, LiveAvatarEngine, settings

    engine = LiveAvatarEngine(preset)
    problems, warnings = engine.check_setup()
    out = [Check("liveavatar", "fail", p, _liveavatar_fix(p, ENV_VARS)) for p in problems]
    out += [Check("liveavatar", "warn", w, "change the preset value named above (--set KEY=VALUE)")
            for w in warnings]
    if not problems:
        conf = settings(preset.liveavatar)
        out.insert(0, Check("liveavatar", "ok", f"repo {conf['repo']}, ckpt {conf['ckpt_dir']}, "
                            f"lora {conf['lora_path']}, torchrun {conf['torchrun']}"))
    # Host RAM of one batch at the area key's own frame size (the portrait is not known here).
    host = memory.host_estimate(preset, total_gb=gpus.host_memory_gb())
    detail = (f"one launch needs about {host.peak_gb:.1f} GB of RAM"
              + ("" if host.total_gb is None else f"; this machine has {host.total_gb:.1f} GB"))
    out.append(Check("host memory", "ok" if host.fits else "fail", detail,
                     "" if host.fits else "turn liveavatar.offload_kv_cache off or lower "
                     f"clips_per_batch (or set {gpus.HOST_MEM_ENV} if the machine's RAM is misread)"))
    return out


def _liveavatar_fix(problem: str, env_vars: dict[str, str]) -> str:
    """The preset key a problem names (`liveavatar.KEY`), else the whole set-up."""
    m = re.search(r"liveavatar\.(\w+)", problem)
    if m is None:
        return LIVEAVATAR_FIX
    key = m.group(1)
    fix = f"set liveavatar.{key} in the preset or with --set liveavatar.{key}=..."
    if key in env_vars:
        fix += f" (or ${env_vars[key]})"
    return fix


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
