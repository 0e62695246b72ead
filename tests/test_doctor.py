"""`avatarcli.doctor`: checks, their fixes, exit code and JSON; no GPU needed."""

from __future__ import annotations

import json
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
from test_telemetry import TWO_GPUS, fake_pynvml

from avatarcli import doctor, gpus
from avatarcli.doctor import Check
from avatarcli.engines.liveavatar.options import LiveAvatarOptions
from avatarcli.errors import InputError
from avatarcli.options import Preset

STANDIN = Path(__file__).resolve().parent / "liveavatar_standin"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(autouse=True)
def no_liveavatar_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("REPO", "TORCHRUN", "CKPT_DIR", "LORA", "PROMPT"):
        monkeypatch.delenv(f"AVATARCLI_LIVEAVATAR_{var}", raising=False)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever this machine has: no NVML, no GPU driver, no nvidia-smi."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(gpus, "_gpu_driver_present", lambda: False)
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(TWO_GPUS))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")


def by_name(checks: list[Check]) -> dict[str, list[Check]]:
    out: dict[str, list[Check]] = {}
    for c in checks:
        out.setdefault(c.name, []).append(c)
    return out


def liveavatar_preset(**opts: Any) -> Preset:
    return Preset(engine="liveavatar", sections={"liveavatar": LiveAvatarOptions(**opts)})


def test_this_machine_without_a_preset(tmp_path: Path, no_gpu: None) -> None:
    checks = doctor.run_checks(jobs_dir=tmp_path / "jobs" / "not-yet")
    found = by_name(checks)
    assert [c.name for c in checks] == ["ffmpeg", "torch", "gpu", "disk"]
    ffmpeg = found["ffmpeg"][0]
    assert ffmpeg.status == "ok" and "libx264" in ffmpeg.detail and ffmpeg.fix == ""
    assert found["torch"][0].status in ("ok", "warn")
    gpu = found["gpu"][0]
    assert gpu.status == "warn" and "cpu-preview" in gpu.fix
    disk = found["disk"][0]
    assert disk.status == "ok" and str(tmp_path) in disk.detail  # the nearest existing parent
    assert doctor.exit_code(checks) == 0
    assert "fix: " in doctor.format_text(checks)


def test_nothing_crashes_without_torch_nvml_or_nvidia_smi(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path, no_gpu: None) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    checks = doctor.run_checks(jobs_dir=tmp_path)
    torch = by_name(checks)["torch"][0]
    assert torch.status == "warn" and torch.fix
    assert doctor.exit_code(checks) == 0


def test_liveavatar_preset_with_a_missing_repo(tmp_path: Path, no_gpu: None) -> None:
    preset = liveavatar_preset(repo=str(tmp_path / "no-such-checkout"), torchrun=TORCHRUN)
    checks = doctor.run_checks(preset=preset, jobs_dir=tmp_path)
    fails = [c for c in checks if c.status == "fail"]
    repo = [c for c in fails if c.name == "liveavatar" and "no-such-checkout" in c.detail]
    assert repo and "liveavatar.repo" in repo[0].fix
    lora = [c for c in fails if "lora_path" in c.detail]
    assert lora and "AVATARCLI_LIVEAVATAR_LORA" in lora[0].fix
    assert all(c.fix for c in fails)
    assert by_name(checks)["gpu"][0].status == "fail"  # LiveAvatar cannot run on a CPU
    assert doctor.exit_code(checks) == 1


def test_liveavatar_set_up_on_two_gpus(tmp_path: Path, two_gpus: None) -> None:
    lora = tmp_path / "liveavatar.safetensors"
    lora.write_bytes(b"stand-in")
    preset = liveavatar_preset(repo=str(STANDIN), torchrun=TORCHRUN, lora_path=str(lora), fp8=True)
    checks = doctor.run_checks(preset=preset, jobs_dir=tmp_path)
    found = by_name(checks)
    assert [c.status for c in found["liveavatar"]] == ["ok"]
    h100, rtx = found["gpu 0"][0], found["gpu 1"][0]
    assert h100.status == "ok"
    assert "80.0 GB total, 79.0 GB free, compute 9.0, fp8 yes (nvml)" in h100.detail
    assert rtx.status == "warn" and "fp8 no" in rtx.detail and "fp8=false" in rtx.fix
    assert doctor.exit_code(checks) == 0


def test_five_gpu_preset_on_two_gpus_fails(tmp_path: Path, two_gpus: None) -> None:
    checks = doctor.check_gpus(liveavatar_preset(gpus_per_run=5))
    assert [c.status for c in by_name(checks)["gpus per launch"]] == ["fail"]


def test_missing_ffmpeg_and_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ffmpeg() -> str:
        raise InputError("ffmpeg not found")

    monkeypatch.setattr(doctor.ffmpeg_bin, "ffmpeg_exe", no_ffmpeg)
    [check] = doctor.check_ffmpeg()
    assert check.status == "fail" and "imageio-ffmpeg" in check.fix

    monkeypatch.setattr(doctor.ffmpeg_bin, "ffmpeg_exe", lambda: "/opt/ffmpeg")
    monkeypatch.setattr(doctor.ffmpeg_bin, "version", lambda: "6.1")
    monkeypatch.setattr(doctor.ffmpeg_bin, "encoders", lambda: {"libx264", "mpeg4"})
    [check] = doctor.check_ffmpeg()
    assert check.status == "fail" and "aac" in check.detail and "libx264" not in check.detail


def test_parse_encoders() -> None:
    text = """Encoders:
 V..... = Video
 A..... = Audio
 ------
 V....D libx264              libx264 H.264 / AVC / MPEG-4 AVC (codec h264)
 VF...D mpeg4                MPEG-4 part 2
 A....D aac                  AAC (Advanced Audio Coding)
 S..... ass                  ASS (Advanced SubStation Alpha) subtitle
"""
    assert doctor.ffmpeg_bin.parse_encoders(text) == {"libx264", "mpeg4", "aac", "ass"}


@pytest.mark.parametrize(("free_gb", "status"), [(100.0, "ok"), (3.0, "warn"), (0.5, "fail")])
def test_disk_thresholds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, free_gb: float,
                         status: str) -> None:
    monkeypatch.setattr(doctor.shutil, "disk_usage",
                        lambda path: Usage(2**40, 0, int(free_gb * 2**30)))
    [check] = doctor.check_disk(tmp_path)
    assert check.status == status and (check.fix == "") == (status == "ok")


def test_a_crashing_check_is_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken() -> list[gpus.GpuFact]:
        raise RuntimeError("driver fell over")

    monkeypatch.setattr(gpus, "facts", broken)
    checks = doctor.run_checks(jobs_dir=tmp_path)
    gpu = by_name(checks)["gpu"][0]
    assert gpu.status == "warn" and "driver fell over" in gpu.detail


def test_json_round_trip() -> None:
    checks = [Check("ffmpeg", "ok", "/usr/bin/ffmpeg"),
              Check("gpu", "warn", "no GPU found", doctor.CPU_HINT),
              Check("liveavatar", "fail", "repo not set", "set liveavatar.repo")]
    text = doctor.to_json(checks)
    data = json.loads(text)
    assert data["ok"] is False and data["checks"][1]["fix"] == doctor.CPU_HINT
    assert doctor.from_json(text) == checks
    assert doctor.exit_code(checks[:2]) == 0 and doctor.exit_code(checks) == 1
