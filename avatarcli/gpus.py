"""What GPUs there are and how much memory they use: the one place that asks the system.

Every call to the outside about GPUs (NVML through `pynvml`, `torch.cuda`, `nvidia-smi`) lives
here, and none of them raises: with no GPU, driver or library the answers are empty.

Units: "GB" means GiB (2**30 bytes) and "MB" MiB (2**20 bytes), as nvidia-smi and memory.py
count them.

Device ids are the system's (NVML / nvidia-smi) indices or GPU UUIDs, as they appear in
CUDA_VISIBLE_DEVICES. CUDA orders devices fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID;
on machines with identical cards (the usual multi-GPU box) both orders agree.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from avatarcli.errors import InputError

log = logging.getLogger(__name__)

GpuSource = Literal["nvml", "torch", "nvidia-smi"]
FP8_MIN_CC = (8, 9)  # torch._scaled_mm's FP8 kernels: Ada (8.9) and Hopper (9.0) or newer
SMI_TIMEOUT_S = 20
TORCH_PROBE_TIMEOUT_S = 120  # importing torch and creating contexts can be slow on a cold disk
SMI_FACT_FIELDS = "index,name,memory.total,memory.free,compute_cap"
SMI_USED_FIELDS = "index,uuid,name,memory.used"
_MIB = 2**20
_GIB = 2**30


HOST_MEM_ENV = "AVATARCLI_HOST_MEM_GB"  # declares this machine's RAM where it is misread


def host_memory_gb() -> float | None:
    """RAM this process may use (GiB): $AVATARCLI_HOST_MEM_GB, else the smaller of the
    machine's physical memory and a cgroup (container) limit; None when unknown."""
    value = os.environ.get(HOST_MEM_ENV, "").strip()
    if value:
        try:
            return float(value)
        except ValueError:
            raise InputError(f"${HOST_MEM_ENV}={value!r}: expected a number of GB") from None
    try:
        import psutil

        total = float(psutil.virtual_memory().total)
    except Exception as exc:  # psutil can fail in odd sandboxes; no verdict then
        log.debug("host memory: %s", exc)
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, float(text))
    return total / _GIB


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


@dataclass(frozen=True)
class GpuFact:
    """One GPU as a source reported it; None where the source does not know."""

    index: str
    name: str
    total_gb: float | None
    free_gb: float | None
    compute_capability: tuple[int, int] | None
    source: GpuSource


def fp8_capable(cc: tuple[int, int] | None) -> bool:
    """Whether a GPU of compute capability `cc` runs FP8 matmuls (8.9+)."""
    return cc is not None and tuple(cc) >= FP8_MIN_CC


@dataclass(frozen=True)
class TorchBuild:
    """This environment's torch: its version and the GPU toolkit it was built for."""

    version: str
    cuda: str | None
    hip: str | None

    @property
    def kind(self) -> str:
        if self.cuda:
            return f"CUDA {self.cuda} build"
        if self.hip:
            return f"ROCm {self.hip} build"
        return "CPU build"


def torch_build() -> TorchBuild | None:
    """torch's version and build, or None when torch is not installed or fails to import.

    Importing torch does not initialise CUDA, so this is safe before forking.
    """
    if not _importable("torch"):
        return None
    try:
        import torch
    except Exception as exc:  # a broken install raises OSError or RuntimeError, not ImportError
        log.debug("import torch failed: %s", exc)
        return None
    version = getattr(torch, "version", None)
    return TorchBuild(version=str(getattr(torch, "__version__", "unknown")),
                      cuda=getattr(version, "cuda", None), hip=getattr(version, "hip", None))


def facts() -> list[GpuFact]:
    """All GPUs: from NVML, else torch.cuda, else nvidia-smi, else []. Never raises."""
    for source, probe in (("nvml", _nvml_facts), ("torch", _torch_facts),
                          ("nvidia-smi", _smi_facts)):
        try:
            found = probe()
        except Exception as exc:  # a source must never break the caller
            log.debug("GPU source %s failed: %s", source, exc)
            continue
        if found:
            return found
    return []


def memory_used_mb(indices: list[str]) -> dict[str, float]:
    """Used memory (MiB) of each device in `indices` that NVML or nvidia-smi knows; {} else."""
    probe = open_memory_probe(indices)
    if probe is None:
        return {}
    try:
        return probe.read()
    finally:
        probe.close()


# -- helpers ---------------------------------------------------------------------------------


def _importable(name: str) -> bool:
    if name in sys.modules:  # None there means blocked (tests do that)
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (blocked)
        return False


def _decode(value: Any) -> str:
    """NVML returns bytes in old pynvml releases and str in newer ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _number(text: str) -> float | None:
    """A nvidia-smi field as a number; None for "[N/A]", "[Not Supported]", "" and the like."""
    try:
        return float(text.strip())
    except ValueError:
        return None


def _cc(text: str) -> tuple[int, int] | None:
    parts = text.strip().split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


# -- NVML ------------------------------------------------------------------------------------


def _nvml() -> ModuleType | None:
    """pynvml (package nvidia-ml-py), initialised; None when absent or no driver answers.

    The caller must call nvmlShutdown() when done (NVML counts its inits)."""
    if not _importable("pynvml"):
        log.debug("NVML: pynvml is not installed (pip install nvidia-ml-py)")
        return None
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded and the like
        log.debug("NVML: init failed: %s", exc)
        return None
    return nvml


def _nvml_facts() -> list[GpuFact]:
    nvml = _nvml()
    if nvml is None:
        return []
    try:
        out = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = _decode(nvml.nvmlDeviceGetName(handle))
            total = free = None
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                total, free = mem.total / _GIB, mem.free / _GIB
            except Exception as exc:  # e.g. not supported on a MIG parent
                log.debug("NVML: memory of GPU %d: %s", i, exc)
            cc = None
            try:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                cc = (int(major), int(minor))
            except Exception as exc:  # absent in old pynvml releases
                log.debug("NVML: compute capability of GPU %d: %s", i, exc)
            out.append(GpuFact(str(i), name, total, free, cc, "nvml"))
        return out
    finally:
        _nvml_shutdown(nvml)


def _nvml_shutdown(nvml: ModuleType) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:
        log.debug("NVML: shutdown failed: %s", exc)


# -- torch.cuda ------------------------------------------------------------------------------


def _gpu_driver_present() -> bool:
    """Whether a GPU driver could be there; False only where we are sure none is (Linux)."""
    if not sys.platform.startswith("linux"):
        return True
    return any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd"))


def torch_rows() -> list[dict[str, Any]]:
    """Devices as torch.cuda sees them (run inside the probe process, see _torch_facts)."""
    import torch

    if not torch.cuda.is_available():
        return []
    rows = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free: int | None = int(torch.cuda.mem_get_info(i)[0])
        except Exception:  # some builds cannot query a busy or exclusive-process device
            free = None
        rows.append({"index": i, "name": props.name, "total": int(props.total_memory),
                     "free": free, "cc": [int(props.major), int(props.minor)]})
    return rows


def _torch_facts() -> list[GpuFact]:
    """GPUs through torch.cuda, in a separate Python process.

    torch.cuda.is_available() and anything after it initialise the CUDA driver in the
    calling process, and a process that did so cannot fork children that use CUDA. So unless
    this process already initialised CUDA, the question is asked in a short-lived child.
    """
    if not _importable("torch"):
        log.debug("torch.cuda: torch is not installed")
        return []
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        rows = torch_rows()  # CUDA is up here already: asking costs nothing more
    else:
        if not _gpu_driver_present():
            log.debug("torch.cuda: no GPU driver (/proc/driver/nvidia, /dev/kfd) on this machine")
            return []
        rows = _torch_rows_in_child()
    return facts_from_torch_rows(rows, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _torch_rows_in_child() -> list[dict[str, Any]]:
    code = "import json, avatarcli.gpus as g; print(json.dumps(g.torch_rows()))"
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=TORCH_PROBE_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("torch.cuda: probe process failed: %s", exc)
        return []
    if proc.returncode != 0:
        log.debug("torch.cuda: probe exited %d: %s", proc.returncode, proc.stderr.strip()[-500:])
        return []
    lines = proc.stdout.strip().splitlines()
    try:
        rows = json.loads(lines[-1]) if lines else []
    except json.JSONDecodeError as exc:
        log.debug("torch.cuda: unreadable probe output: %s", exc)
        return []
    return rows if isinstance(rows, list) else []


def facts_from_torch_rows(rows: list[dict[str, Any]],
                          cuda_visible: str | None = None) -> list[GpuFact]:
    """GpuFacts from torch_rows() output; torch's ordinals mapped back through
    CUDA_VISIBLE_DEVICES to the system's ids when it lists one id per device."""
    ids = [v.strip() for v in cuda_visible.split(",")] if cuda_visible else []
    out = []
    for row in rows:
        i = int(row["index"])
        index = ids[i] if len(ids) == len(rows) and ids[i] else str(i)
        cc = row.get("cc")
        free = row.get("free")
        out.append(GpuFact(index, str(row.get("name", "")), int(row["total"]) / _GIB,
                           None if free is None else int(free) / _GIB,
                           (int(cc[0]), int(cc[1])) if cc else None, "torch"))
    return out


# -- nvidia-smi ------------------------------------------------------------------------------


def _smi(fields: str) -> str | None:
    """nvidia-smi's csv for `fields`, or None when it is absent or refuses."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        log.debug("nvidia-smi: not on PATH")
        return None
    try:
        proc = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=SMI_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi: %s", exc)
        return None
    if proc.returncode != 0:
        log.debug("nvidia-smi --query-gpu=%s exited %d: %s", fields, proc.returncode,
                  (proc.stdout + proc.stderr).strip()[-300:])
        return None
    return proc.stdout


def _smi_facts() -> list[GpuFact]:
    if shutil.which("nvidia-smi") is None:
        log.debug("nvidia-smi: not on PATH")
        return []
    text = _smi(SMI_FACT_FIELDS)
    if text is not None:
        return parse_smi_facts(text, with_cc=True)
    # Drivers before 510 do not know compute_cap and refuse the whole query.
    text = _smi(SMI_FACT_FIELDS.removesuffix(",compute_cap"))
    return [] if text is None else parse_smi_facts(text, with_cc=False)


def _split_row(line: str, n: int, name_at: int) -> list[str] | None:
    """A csv row of `n` fields; extra commas belong to the name field at `name_at`."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < n:
        return None
    extra = len(parts) - n
    return [*parts[:name_at], ", ".join(parts[name_at:name_at + extra + 1]),
            *parts[name_at + extra + 1:]]


def parse_smi_facts(text: str, *, with_cc: bool = True) -> list[GpuFact]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.free[,compute_cap]
    --format=csv,noheader,nounits` (memory in MiB). Unreadable lines are skipped."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = _split_row(line, 5 if with_cc else 4, name_at=1)
        if row is None or not row[0].isdigit():
            log.debug("nvidia-smi: skipped line %r", line)
            continue
        total, free = _number(row[2]), _number(row[3])
        out.append(GpuFact(row[0], row[1], None if total is None else total / 1024,
                           None if free is None else free / 1024,
                           _cc(row[4]) if with_cc else None, "nvidia-smi"))
    return out


def parse_smi_used(text: str) -> dict[str, tuple[str, str, float]]:
    """Parse `nvidia-smi --query-gpu=index,uuid,name,memory.used --format=csv,noheader,nounits`
    into {index: (uuid, name, used MiB)}; devices without a number are left out."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        used = _number(parts[-1])
        if used is not None:
            out[parts[0]] = (parts[1], ", ".join(parts[2:-1]), used)
    return out


# -- memory probes (used by telemetry.Sampler) -----------------------------------------------


class MemoryProbe:
    """Reads used memory of some devices, repeatedly. Close it when done."""

    source: GpuSource = "nvml"
    # Seconds between reads worth paying for: NVML reads are cheap, nvidia-smi spawns a process.
    min_interval_s: float = 0.0
    name: str | None = None  # name of the first device, when known

    def read(self) -> dict[str, float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _NvmlProbe(MemoryProbe):
    source = "nvml"
    min_interval_s = 0.0

    def __init__(self, nvml: ModuleType, handles: dict[str, Any], name: str | None) -> None:
        self.nvml, self.handles, self.name = nvml, handles, name

    def read(self) -> dict[str, float]:
        out = {}
        for index, handle in self.handles.items():
            try:
                out[index] = self.nvml.nvmlDeviceGetMemoryInfo(handle).used / _MIB
            except Exception as exc:  # a device fell off the bus or is being reset
                log.debug("NVML: memory of GPU %s: %s", index, exc)
        return out

    def close(self) -> None:
        _nvml_shutdown(self.nvml)


class _SmiProbe(MemoryProbe):
    source = "nvidia-smi"
    min_interval_s = 1.0

    def __init__(self, indices: list[str]) -> None:
        self.indices = indices

    def read(self) -> dict[str, float]:
        text = _smi(SMI_USED_FIELDS)
        if text is None:
            return {}
        rows = parse_smi_used(text)
        by_uuid = {uuid: (uuid, name, used) for uuid, name, used in rows.values()}
        out = {}
        for index in self.indices:
            row = rows.get(index) or by_uuid.get(index)
            if row is not None:
                out[index] = row[2]
                if self.name is None:
                    self.name = row[1]
        return out


def _nvml_probe(indices: list[str]) -> MemoryProbe | None:
    nvml = _nvml()
    if nvml is None:
        return None
    handles: dict[str, Any] = {}
    name = None
    for index in indices:
        try:
            if index.isdigit():
                handle = nvml.nvmlDeviceGetHandleByIndex(int(index))
            else:  # GPU-<uuid> as CUDA_VISIBLE_DEVICES may list it
                handle = nvml.nvmlDeviceGetHandleByUUID(index)
            handles[index] = handle
            if name is None:
                name = _decode(nvml.nvmlDeviceGetName(handle))
        except Exception as exc:
            log.debug("NVML: no device %r: %s", index, exc)
    if not handles:
        _nvml_shutdown(nvml)
        return None
    return _NvmlProbe(nvml, handles, name)


def open_memory_probe(indices: list[str]) -> MemoryProbe | None:
    """A probe for `indices` through NVML, else nvidia-smi; None when neither answers."""
    if not indices:
        return None
    try:
        probe = _nvml_probe(indices)
    except Exception as exc:
        log.debug("NVML probe failed: %s", exc)
        probe = None
    if probe is not None:
        return probe
    smi = _SmiProbe(indices)
    started = time.monotonic()
    if not smi.read():
        log.debug("no GPU memory source for %s", ",".join(indices))
        return None
    log.debug("nvidia-smi memory probe: %.2f s per read", time.monotonic() - started)
    return smi
