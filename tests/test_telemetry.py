"""Telemetry (process-tree sampler, job aggregation) and the GPU facts it relies on (gpus.py).

No GPU is needed: NVML is replaced by a fake `pynvml` module and nvidia-smi by sample text.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from avatarcli import gpus, telemetry
from avatarcli.telemetry import Sampler, Telemetry

# -- a fake NVML -----------------------------------------------------------------------------


@dataclass
class _Mem:
    total: int
    free: int
    used: int


def fake_pynvml(devices: list[dict[str, Any]]) -> types.ModuleType:
    """A `pynvml` module with just what gpus.py calls; counts inits and shutdowns."""
    mod: Any = types.ModuleType("pynvml")
    mod.__spec__ = importlib.machinery.ModuleSpec("pynvml", None)
    state = {"inits": 0, "shutdowns": 0}
    by_uuid = {d["uuid"]: i for i, d in enumerate(devices)}

    def handle(i: int) -> int:
        if not 0 <= i < len(devices):
            raise RuntimeError(f"NVML: invalid index {i}")
        return i

    mod.state = state
    mod.nvmlInit = lambda: state.__setitem__("inits", state["inits"] + 1)
    mod.nvmlShutdown = lambda: state.__setitem__("shutdowns", state["shutdowns"] + 1)
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = handle
    mod.nvmlDeviceGetHandleByUUID = lambda u: by_uuid[u]
    mod.nvmlDeviceGetName = lambda h: devices[h]["name"]
    mod.nvmlDeviceGetMemoryInfo = lambda h: _Mem(**devices[h]["mem"])
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: devices[h]["cc"]
    return mod


GIB, MIB = 2**30, 2**20
TWO_GPUS = [
    {"name": b"NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa", "cc": (9, 0),
     "mem": {"total": 80 * GIB, "free": 79 * GIB, "used": 1 * GIB}},
    {"name": "NVIDIA GeForce RTX 3090", "uuid": "GPU-bbbb", "cc": (8, 6),
     "mem": {"total": 24 * GIB, "free": 20 * GIB, "used": 4 * GIB}},
]


@pytest.fixture
def no_gpu_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without NVML, a GPU driver or nvidia-smi, whatever this one has."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(gpus, "_gpu_driver_present", lambda: False)
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    mod = fake_pynvml(TWO_GPUS)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    yield mod
    state: Any = mod.state
    assert state["inits"] == state["shutdowns"]


# -- gpus: nvidia-smi parsing ----------------------------------------------------------------

SMI_FACTS = """\
0, NVIDIA H100 80GB HBM3, 81559, 81002, 9.0
1, NVIDIA A100-SXM4-40GB, 40960, [N/A], 8.0

2, NVIDIA L40S, [Not Supported], 45000, [N/A]
garbage that is not a row
3, NVIDIA RTX 6000 Ada Generation, 49140, 48000, 8.9
"""
SMI_FACTS_OLD_DRIVER = """\
0, Tesla V100-SXM2-16GB, 16160, 16000
1, Tesla, Quirky, Name, 16160, 15000
"""


def test_parse_smi_facts_reads_numbers_and_unknowns() -> None:
    got = gpus.parse_smi_facts(SMI_FACTS)
    assert [g.index for g in got] == ["0", "1", "2", "3"]
    h100 = got[0]
    assert h100.name == "NVIDIA H100 80GB HBM3"
    assert h100.total_gb == pytest.approx(81559 / 1024)
    assert h100.free_gb == pytest.approx(81002 / 1024)
    assert h100.compute_capability == (9, 0)
    assert h100.source == "nvidia-smi"
    assert got[1].free_gb is None and got[1].compute_capability == (8, 0)
    assert got[2].total_gb is None and got[2].compute_capability is None
    assert got[3].compute_capability == (8, 9)


def test_parse_smi_facts_of_an_old_driver_without_compute_cap() -> None:
    got = gpus.parse_smi_facts(SMI_FACTS_OLD_DRIVER, with_cc=False)
    assert [(g.index, g.name, g.compute_capability) for g in got] == [
        ("0", "Tesla V100-SXM2-16GB", None), ("1", "Tesla, Quirky, Name", None)]
    assert got[1].free_gb == pytest.approx(15000 / 1024)


def test_parse_smi_used() -> None:
    text = "0, GPU-aaaa, NVIDIA H100 80GB HBM3, 61234\n1, GPU-bbbb, NVIDIA H100, [N/A]\n\n"
    assert gpus.parse_smi_used(text) == {"0": ("GPU-aaaa", "NVIDIA H100 80GB HBM3", 61234.0)}


def test_fp8_capable() -> None:
    assert gpus.fp8_capable((8, 9)) and gpus.fp8_capable((9, 0)) and gpus.fp8_capable((10, 0))
    assert not gpus.fp8_capable((8, 6)) and not gpus.fp8_capable((8, 0))
    assert not gpus.fp8_capable(None)


# -- gpus: sources ---------------------------------------------------------------------------


def test_facts_empty_without_any_source(no_gpu_sources: None) -> None:
    assert gpus.facts() == []
    assert gpus.memory_used_mb(["0"]) == {}


def test_facts_empty_on_a_machine_without_gpus() -> None:
    if gpus._gpu_driver_present() or gpus.shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU driver")
    assert gpus.facts() == []


def test_facts_from_fake_nvml(nvml: types.ModuleType) -> None:
    got = gpus.facts()
    assert got == [
        gpus.GpuFact("0", "NVIDIA H100 80GB HBM3", 80.0, 79.0, (9, 0), "nvml"),
        gpus.GpuFact("1", "NVIDIA GeForce RTX 3090", 24.0, 20.0, (8, 6), "nvml"),
    ]


def test_memory_used_from_fake_nvml_by_index_and_uuid(nvml: types.ModuleType) -> None:
    assert gpus.memory_used_mb(["1", "GPU-aaaa", "7"]) == {"1": 4096.0, "GPU-aaaa": 1024.0}
    assert gpus.memory_used_mb([]) == {}


def test_nvml_that_fails_to_init_falls_through(monkeypatch: pytest.MonkeyPatch,
                                               no_gpu_sources: None) -> None:
    mod: Any = fake_pynvml(TWO_GPUS)

    def broken() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    mod.nvmlInit = broken
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    assert gpus.facts() == []


def test_nvidia_smi_of_an_old_driver(monkeypatch: pytest.MonkeyPatch, no_gpu_sources: None) -> None:
    def smi(fields: str) -> str | None:
        if "compute_cap" in fields:
            return None  # 'Field "compute_cap" is not a valid field to query.'
        if fields == gpus.SMI_USED_FIELDS:
            return "0, GPU-aaaa, Tesla V100-SXM2-16GB, 5000\n"
        return SMI_FACTS_OLD_DRIVER

    monkeypatch.setattr(gpus.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpus, "_smi", smi)
    got = gpus.facts()
    assert [(g.index, g.source, g.compute_capability) for g in got] == [
        ("0", "nvidia-smi", None), ("1", "nvidia-smi", None)]
    assert gpus.memory_used_mb(["0", "GPU-aaaa", "1"]) == {"0": 5000.0, "GPU-aaaa": 5000.0}


def test_torch_rows_map_back_through_cuda_visible_devices() -> None:
    rows = [{"index": 0, "name": "NVIDIA H100", "total": 80 * GIB, "free": None, "cc": [9, 0]},
            {"index": 1, "name": "NVIDIA H100", "total": 80 * GIB, "free": 40 * GIB, "cc": [9, 0]}]
    got = gpus.facts_from_torch_rows(rows, "2,3")
    assert [(g.index, g.total_gb, g.free_gb, g.source) for g in got] == [
        ("2", 80.0, None, "torch"), ("3", 80.0, 40.0, "torch")]
    assert [g.index for g in gpus.facts_from_torch_rows(rows, None)] == ["0", "1"]


def test_torch_probe_runs_in_a_child(monkeypatch: pytest.MonkeyPatch,
                                                           no_gpu_sources: None) -> None:
    """The torch path really runs (in a child process, so CUDA never starts in this one), and
    what that child reports is what facts() returns."""
    pytest.importorskip("torch")
    monkeypatch.setattr(gpus, "_gpu_driver_present", lambda: True)
    children: list[subprocess.CompletedProcess[str]] = []
    real_run = subprocess.run

    def spy(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = real_run(cmd, **kw)
        if cmd[:2] == [sys.executable, "-c"] and "torch_rows()" in cmd[2]:
            children.append(proc)
        return proc

    monkeypatch.setattr(gpus.subprocess, "run", spy)
    got = gpus.facts()
    assert "torch" not in sys.modules or not sys.modules["torch"].cuda.is_initialized()
    assert len(children) == 1 and children[0].returncode == 0, children
    rows = json.loads(children[0].stdout.strip().splitlines()[-1])
    assert isinstance(rows, list)
    assert got == gpus.facts_from_torch_rows(rows, os.environ.get("CUDA_VISIBLE_DEVICES"))
    build = gpus.torch_build()
    assert build is not None
    if build.kind == "CPU build":  # this machine: the child ran torch and saw no device
        assert rows == [] and got == []
    else:  # a CUDA build: every device the child saw became a fact with its memory
        assert len(got) == len(rows) and all(g.source == "torch" and g.total_gb for g in got)


def test_torch_build() -> None:
    torch = pytest.importorskip("torch")  # the dev extra installs it
    build = gpus.torch_build()
    assert build is not None and build.version == torch.__version__
    assert build.cuda == torch.version.cuda and build.kind.endswith("build")
    assert (build.kind == "CPU build") == (torch.version.cuda is None and torch.version.hip is None)


def test_torch_build_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    assert gpus.torch_build() is None


# -- Sampler ---------------------------------------------------------------------------------

# A parent holding ~100 MB with a child of its own holding ~50 MB; says "ready" once both do.
TREE = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import sys, time; x = b'c' * (50 << 20); print('ready', flush=True); time.sleep(60)"],
    stdout=subprocess.PIPE)
x = b'p' * (100 << 20)
child.stdout.readline()
print('ready', flush=True)
time.sleep(1.0)
child.kill()
child.wait()
"""


def test_sampler_sees_the_whole_process_tree(no_gpu_sources: None) -> None:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE)
    sampler = Sampler(proc.pid, ["0"], interval_s=0.05).start()
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    time.sleep(0.2)  # the sampler keeps going after the tree has gone
    t = sampler.stop()
    t.frames = 250
    assert t.peak_rss_mb is not None and t.peak_rss_mb > 140
    assert t.wall_s >= 1.0
    assert t.peak_gpu_mb == {} and t.gpu_name is None
    assert t.summary_line().endswith("GPU n/a")
    assert t.fps == pytest.approx(250 / t.wall_s)
    d = t.to_dict()
    assert d["peak_gpu_mb"] == {} and d["gpu_name"] is None
    back = Telemetry.from_dict(d).to_dict()
    assert back["fps"] == pytest.approx(d.pop("fps"), rel=1e-3)
    assert {k: v for k, v in back.items() if k != "fps"} == d


def test_sampler_of_a_process_that_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    t = Sampler(proc.pid, [], interval_s=0.01).start().stop()
    assert t.peak_rss_mb is None and t.peak_gpu_mb == {}


def test_sampler_reads_gpu_peaks_through_nvml(nvml: types.ModuleType) -> None:
    sampler = Sampler(os.getpid(), ["0", "1"], interval_s=0.01).start()
    time.sleep(0.1)
    TWO_GPUS[1]["mem"]["used"] = 6 * GIB  # a peak in the middle
    try:
        time.sleep(0.1)
    finally:
        TWO_GPUS[1]["mem"]["used"] = 4 * GIB
    time.sleep(0.05)
    t = sampler.stop()
    assert t.peak_gpu_mb == {"0": 1024.0, "1": 6144.0}
    assert t.gpu_name == "NVIDIA H100 80GB HBM3"
    assert t.summary_line().endswith("GPU 0: 1024 MB, 1: 6144 MB")


# -- Telemetry and aggregation ---------------------------------------------------------------


def test_summary_line_format() -> None:
    t = Telemetry(wall_s=12.3, frames=3000, peak_rss_mb=231.4,
                  peak_gpu_mb={"10": 1.0, "1": 60110.2, "0": 61234.0})
    assert t.summary_line() == ("12.3 s, 243.9 frames/s, peak RSS 231 MB, "
                                "GPU 0: 61234 MB, 1: 60110 MB, 10: 1 MB")
    empty = Telemetry(wall_s=0.0)
    assert empty.fps is None
    assert empty.summary_line() == "0.0 s, n/a frames/s, peak RSS n/a, GPU n/a"
    assert empty.to_dict()["fps"] is None and empty.to_dict()["peak_rss_mb"] is None


def test_aggregate_parallel_and_resumed_batches() -> None:
    parts: list[dict[str, Any] | None] = [
        # two batches at once on two GPUs, then (after a pause: a resumed job) a third
        Telemetry(10.0, 250, 300.0, {"0": 60000.0}, "H100", started_at=1000.0).to_dict(),
        Telemetry(12.0, 250, 350.0, {"1": 61000.0}, "H100", started_at=1002.0).to_dict(),
        None,  # a batch without telemetry (an older manifest)
        Telemetry(8.0, 200, 320.0, {"0": 62000.0}, "H100", started_at=5000.0).to_dict(),
    ]
    s = telemetry.aggregate(parts)
    assert s["parts"] == 3
    assert s["wall_s"] == pytest.approx(30.0)
    assert s["elapsed_s"] == pytest.approx(14.0 + 8.0)  # [1000, 1014] and [5000, 5008]
    assert s["frames"] == 700
    assert s["fps"] == pytest.approx(700 / 22.0, abs=1e-3)
    assert s["peak_rss_mb"] == 350.0
    assert s["peak_gpu_mb"] == {"0": 62000.0, "1": 61000.0}
    assert s["gpu_name"] == "H100"
    assert s["summary"].startswith("22.0 s, 31.8 frames/s, peak RSS 350 MB, GPU 0: 62000 MB")


def test_aggregate_without_start_times_or_anything() -> None:
    s = telemetry.aggregate([{"wall_s": 4.0, "frames": 100, "peak_rss_mb": None},
                             {"wall_s": 6.0, "frames": 150}])
    assert s["elapsed_s"] is None and s["wall_s"] == 10.0 and s["fps"] == 25.0
    assert s["peak_rss_mb"] is None and s["peak_gpu_mb"] == {}
    empty = telemetry.aggregate([])
    assert empty["parts"] == 0 and empty["fps"] is None
    assert empty["summary"] == "0.0 s, n/a frames/s, peak RSS n/a, GPU n/a"
