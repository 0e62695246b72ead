"""`avatar plan`, `avatar doctor`, `-p auto` and per-batch telemetry, on a machine with no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from avatarcli import gpus, history, presets
from avatarcli.cli import app

runner = CliRunner()


def fake_gpus(monkeypatch: pytest.MonkeyPatch, n: int, total_gb: float,
              cc: tuple[int, int] = (9, 0)) -> None:
    cards = [gpus.GpuFact(str(i), "NVIDIA H100 80GB HBM3", total_gb, total_gb - 1, cc, "nvml")
             for i in range(n)]
    monkeypatch.setattr(gpus, "facts", lambda: cards)


def test_plan_reproduces_the_5x24gb_field_case() -> None:
    result = runner.invoke(app, ["plan", "-p", "liveavatar-5x80gb", "--gpu-count", "5",
                                 "--gpu-mem", "24", "--set", "liveavatar.extra_args=[--dit_fsdp]",
                                 "--json"])
    assert result.exit_code == 0, result.output  # --json reports; the verdict is in "fits"
    data = json.loads(result.stdout)
    assert set(data) >= {"per_gpu_peak_gb", "usable_gb", "fits", "components"}
    assert data["fits"] is False
    assert data["usable_gb"] == pytest.approx(22.15, abs=0.1)
    assert data["components"]["regather"] == pytest.approx(4.17, abs=0.1)
    human = runner.invoke(app, ["plan", "-p", "liveavatar-5x80gb", "--gpu-mem", "24",
                                "--set", "liveavatar.extra_args=[--dit_fsdp]"])
    assert human.exit_code == 1  # does not fit
    assert "regather 25.6" in human.output and "does NOT fit" in human.output


def test_plan_with_audio_and_no_gpu_shows_batches_but_no_history(
        media: dict[str, Path]) -> None:
    """History is keyed by GPU model: with only --gpu-mem there is none to look up (the time
    from history is test_plan_uses_seen_figures_for_this_gpu_model)."""
    preset = presets.resolve("liveavatar-80gb").preset
    history.record(preset, {"fps": 2.5, "gpu_name": "NVIDIA H100 80GB HBM3",
                            "peak_gpu_mb": {"0": 70000.0}, "peak_rss_mb": 9000.0})
    # no GPU here: the card is given, so "seen" (keyed by GPU model) stays empty
    result = runner.invoke(app, ["plan", str(media["speech30"]), "-p", "liveavatar-80gb",
                                 "--gpu-mem", "80", "--json"])
    data = json.loads(result.stdout)
    assert data["fits"] is True and data["frames"] == 750 and len(data["batches"]) == 1
    assert data["seen"] == {} and data["est_seconds"] is None


def test_plan_uses_seen_figures_for_this_gpu_model(media: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 1, 79.6)
    preset = presets.resolve("liveavatar-80gb").preset
    history.record(preset, {"fps": 2.5, "gpu_name": "NVIDIA H100 80GB HBM3",
                            "peak_gpu_mb": {"0": 71680.0}, "peak_rss_mb": 9000.0})
    result = runner.invoke(app, ["plan", str(media["speech30"]), "-p", "liveavatar-80gb"])
    assert result.exit_code == 0, result.output
    assert "2.5 frames/s, peak 70.0 GB per GPU" in result.output
    assert "estimated time: 5.0 min" in result.output  # 750 frames at 2.5 frames/s


def test_plan_needs_a_card_size_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "facts", lambda: [])
    result = runner.invoke(app, ["plan", "-p", "liveavatar-80gb"])
    assert result.exit_code == 2 and "--gpu-mem" in result.output
    cpu = runner.invoke(app, ["plan", "-p", "cpu-preview"])
    assert cpu.exit_code == 0 and "runs on the CPU" in cpu.output


@pytest.mark.parametrize(("n", "gb", "cc", "expected"), [
    (0, 0, (9, 0), "cpu-preview"),
    (1, 80, (9, 0), "liveavatar-80gb"),
    (5, 80, (9, 0), "liveavatar-5x80gb"),
    (1, 24, (8, 6), "liveavatar-24gb"),  # the resident worker's levers, no fp8 needed
    (1, 32, (12, 0), "liveavatar-32gb"),
    (1, 16, (8, 6), "cpu-preview"),
    # 48 GB: fp8 needs compute capability 8.9+: the same 47.99 GiB card gets the bf16 lever
    # preset at 8.6 (RTX A6000) and the fp8 one at 8.9 (L40S-class).
    (1, 47.99, (8, 6), "liveavatar-48gb"),
    (1, 47.99, (8, 9), "liveavatar-48gb-fp8"),
])
def test_auto_preset_picks_what_fits(media: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, n: int, gb: float,
                                     cc: tuple[int, int], expected: str) -> None:
    fake_gpus(monkeypatch, n, gb, cc)
    monkeypatch.setenv("AVATARCLI_HOST_MEM_GB", "256")  # a GPU server's RAM
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(tmp_path / "x.mp4"), "-p", "auto", "--dry-run",
                                 "--json"])
    assert f"preset auto: {expected} (" in result.output
    assert json.loads(result.stdout)["preset"] == expected
    if cc < (8, 9):  # never an fp8 preset below compute capability 8.9
        assert not presets.resolve(expected).preset.liveavatar.fp8


def test_doctor_without_gpu(tmp_path: Path) -> None:
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["ffmpeg"]["status"] == "ok" and "libx264" in checks["ffmpeg"]["detail"]
    assert checks["gpu"]["status"] == "warn" and "cpu-preview" in checks["gpu"]["fix"]
    broken = runner.invoke(app, ["doctor", "-p", "liveavatar-80gb"])
    assert broken.exit_code == 1 and "liveavatar.repo" in broken.output


@pytest.mark.slow
def test_telemetry_is_recorded_per_batch(media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.mp4"
    run = subprocess.run([sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]),
                          str(media["portrait"]), "-o", str(out), "--set", "size=256*256",
                          "--set", "clips_per_batch=2", "--keep-parts", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    for batch in summary["plan"]:
        t = batch["telemetry"]
        assert t["frames"] == batch["frame_end"] - batch["frame_start"]
        assert t["peak_rss_mb"] > 20 and t["fps"] > 0 and t["peak_gpu_mb"] == {}
    assert "GPU n/a" in summary["telemetry"]["summary"]
    manifest = json.loads((tmp_path / "t.mp4.parts" / "manifest.json").read_text())
    assert all(p["telemetry"]["peak_rss_mb"] for p in manifest["parts"])


def test_auto_preset_needs_the_host_ram_of_its_levers(media: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 1, 24, (8, 6))
    monkeypatch.setenv("AVATARCLI_HOST_MEM_GB", "32")  # the 24 GB preset loads in ~48 GB
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(tmp_path / "x.mp4"), "-p", "auto", "--dry-run"])
    assert "preset auto: cpu-preview (" in result.output
    monkeypatch.setenv("AVATARCLI_HOST_MEM_GB", "64")
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(tmp_path / "x.mp4"), "-p", "auto", "--dry-run"])
    assert "preset auto: liveavatar-24gb (" in result.output and "frames/s per GPU" in result.output


def test_plan_estimates_at_the_frame_size_gen_renders(media: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """`plan --image` and `gen` decide the frame size through one function: a tall portrait
    gives the same width and height in both, and another estimate than the area key's."""
    from PIL import Image

    tall = tmp_path / "tall.png"
    Image.open(media["portrait"]).resize((300, 520)).save(tall)
    args = ["plan", "-p", "liveavatar-80gb", "--gpu-mem", "80", "--json"]
    planned = runner.invoke(app, [*args, "--image", str(tall)])
    assert planned.exit_code == 0, planned.output
    dry = runner.invoke(app, ["gen", str(media["speech6"]), str(tall), "-p", "liveavatar-80gb",
                              "-o", str(tmp_path / "out.mp4"), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan, gen = json.loads(planned.stdout), json.loads(dry.stdout)
    assert (plan["width"], plan["height"]) == (gen["width"], gen["height"])
    assert gen["height"] > gen["width"]  # upright, as the portrait is
    square = json.loads(runner.invoke(app, args).stdout)
    key = presets.parse_size(presets.resolve("liveavatar-80gb").preset.size)
    assert (square["width"], square["height"]) == key  # the area key's own sides
    assert plan["per_gpu_peak_gb"] != square["per_gpu_peak_gb"]
