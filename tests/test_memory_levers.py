"""The planner's model of the resident worker's levers and `avatar plan --fit` (no GPU)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from avatarcli import presets
from avatarcli.cli import app
from avatarcli.engines.liveavatar import memory
from avatarcli.options import Preset

runner = CliRunner()
LEVERS = ("resident_blocks", "weight_storage", "offload_kv_cache", "encoders", "fp8")


def preset(name: str = "liveavatar-80gb", overrides: dict[str, Any] | None = None) -> Preset:
    return presets.resolve(name, overrides).preset


def la(**kw: Any) -> dict[str, Any]:
    return {"liveavatar": kw}


def test_no_levers_is_the_old_model() -> None:
    base = preset()
    assert (base.liveavatar.resident_blocks, base.liveavatar.weight_storage) == (40, "bf16")
    assert memory.dit_gpu_gb(base.liveavatar) == pytest.approx(memory.dit_weights_gb(False))
    fp8 = preset(overrides=la(fp8=True)).liveavatar
    assert memory.dit_gpu_gb(fp8) == pytest.approx(memory.dit_weights_gb(True))
    est = memory.estimate(base, gpu_mem_gb=80)
    assert est.phases["load"]["dit_weights"] == pytest.approx(memory.dit_weights_gb(False))
    assert est.cost is not None and est.cost.weights_gb == 0 and est.cost.kv_gb == 0


def test_each_swapped_block_moves_one_block_from_gpu_to_host() -> None:
    def at(k: int, storage: str = "bf16") -> tuple[float, float]:
        # KV caches in host memory: rendering, not loading, is the host peak
        p = preset(overrides=la(resident_blocks=k, weight_storage=storage,
                                offload_kv_cache=True))
        est = memory.estimate(p, gpu_mem_gb=80)
        host = memory.host_estimate(p, total_gb=None)
        assert "dit_load_bf16" not in host.components
        return est.phase_gb("denoise"), host.components.get("dit_swapped_blocks", 0.0)

    for storage in ("bf16", "int8"):
        block = memory.block_gb(storage)
        gpu30, host30 = at(30, storage)
        gpu29, host29 = at(29, storage)
        assert gpu30 - gpu29 == pytest.approx(block)
        assert host29 - host30 == pytest.approx(block)
        assert host30 == pytest.approx(10 * block)
    # two swap slots (the running block + one prefetched) stay on the GPU
    gpu40, _ = at(40)
    gpu39, _ = at(39)
    assert gpu40 - gpu39 == pytest.approx(0.0)  # 1 swapped block still needs its slot
    two = preset(overrides=la(resident_blocks=30, prefetch_blocks=2)).liveavatar
    assert memory.swap_slots(two) == 3


def test_one_byte_storage_halves_the_blocks_and_their_transfer() -> None:
    ratio = memory.block_gb("int8") / memory.block_gb("bf16")
    assert 0.5 < ratio < 0.51  # plus a fp32 scale per output channel
    assert memory.block_gb("fp8") == memory.block_gb("int8")
    assert memory.block_gb("fp8-native") < memory.block_gb("int8")  # a scalar scale upstream
    bf16 = memory.step_cost(preset(overrides=la(resident_blocks=10)))
    int8 = memory.step_cost(preset(overrides=la(resident_blocks=10, weight_storage="int8")))
    assert int8.weights_gb / bf16.weights_gb == pytest.approx(ratio)
    assert bf16.weights_gb == pytest.approx(30 * memory.block_gb("bf16"))
    assert int8.compute_s > bf16.compute_s  # dequantising each layer costs a little


def test_host_kv_caches_cost_a_copy_in_and_out_per_step() -> None:
    p = preset(overrides=la(offload_kv_cache=True))
    w, h = presets.parse_size(p.size)
    per = memory.kv_cache_gb(memory.kv_tokens(p.infer_frames, w, h)) + memory.kv_cache_gb(
        memory.COND_CACHE_TOKENS_SINGLE)
    cost = memory.step_cost(p, pcie_gib_s=10.0)
    assert cost.kv_gb == pytest.approx(2 * per)
    assert cost.kv_s == pytest.approx(2 * per / 10.0)
    assert cost.step_s == pytest.approx(cost.kv_s + cost.compute_s)  # not hidden: compute stream
    swap = memory.step_cost(preset(overrides=la(resident_blocks=0)), pcie_gib_s=1.0)
    assert swap.step_s == pytest.approx(max(swap.compute_s, swap.weights_s))  # side stream
    assert memory.host_estimate(p, total_gb=None).components["kv_cache"] == pytest.approx(4 * per)


def test_encoders_on_the_cpu_never_reach_the_gpu() -> None:
    est = memory.estimate(preset(overrides=la(encoders="cpu")), gpu_mem_gb=80)
    assert all("text_encoder" not in p and "audio_encoder" not in p for p in est.phases.values())
    gpu = memory.estimate(preset(), gpu_mem_gb=80)
    assert "text_encoder" in gpu.phases["loaded"] and "audio_encoder" in gpu.phases["encode_media"]


def test_swapped_or_quantised_dits_load_in_host_memory() -> None:
    for lever in (la(resident_blocks=39), la(weight_storage="int8")):
        p = preset(overrides=lever)
        est = memory.estimate(p, gpu_mem_gb=80)
        assert "dit_weights" not in est.phases["load"]  # never whole on the GPU
        host = memory.host_estimate(p, total_gb=None)
        assert host.components["dit_load_bf16"] == pytest.approx(memory.dit_weights_gb(False))
    plain = memory.host_estimate(preset(), total_gb=None)
    assert "dit_load_bf16" not in plain.components


def test_fit_takes_no_levers_when_the_card_is_big_enough() -> None:
    found = memory.fit_levers(preset(), gpu_mem_gb=80)
    assert found is not None
    assert found.settings["liveavatar.resident_blocks"] == 40
    assert found.settings["liveavatar.weight_storage"] == "bf16"
    assert found.settings["liveavatar.offload_kv_cache"] is False


def test_fit_is_the_fastest_that_fits() -> None:
    base = preset()
    found = memory.fit_levers(base, gpu_mem_gb=24)
    assert found is not None and found.estimate.fits
    assert found.estimate.headroom_gb >= memory.FIT_MARGIN_GB
    # brute force over the same space: nothing that fits is faster
    best = 0.0
    for storage in ("bf16", "int8"):
        for kv in (False, True):
            for enc in ("gpu", "cpu"):
                for k in range(41):
                    p = preset(overrides=la(resident_blocks=k, weight_storage=storage,
                                            offload_kv_cache=kv, encoders=enc))
                    est = memory.estimate(p, gpu_mem_gb=24)
                    if est.fits and est.headroom_gb >= memory.FIT_MARGIN_GB:
                        best = max(best, memory.step_cost(p).fps)
    assert best > 0 and found.cost.fps == pytest.approx(best, rel=1e-3)
    # the chosen settings, applied with --set, give the same estimate
    again = preset(overrides=presets.parse_set([line.removeprefix("--set ")
                                                for line in found.set_lines()]))
    assert memory.estimate(again, gpu_mem_gb=24).per_gpu_peak_gb == pytest.approx(
        found.estimate.per_gpu_peak_gb)


def test_fit_respects_host_ram_and_shares_it_between_workers() -> None:
    assert memory.fit_levers(preset(), gpu_mem_gb=24, host_mem_gb=64) is None
    all5 = memory.fit_levers(preset(), gpus=5, gpu_mem_gb=24)
    assert all5 is not None and all5.workers == 5
    assert all5.fps == pytest.approx(5 * all5.cost.fps)
    some = memory.fit_levers(preset(), gpus=5, gpu_mem_gb=24, host_mem_gb=256)
    assert some is not None and 1 <= some.workers < 5
    assert some.workers * some.host.peak_gb <= 256
    assert (some.workers + 1) * some.host.peak_gb > 256 or some.workers == 5


@pytest.mark.parametrize(("name", "gb"), [("liveavatar-24gb", 24), ("liveavatar-32gb", 32),
                                          ("liveavatar-48gb", 48)])
def test_budget_presets_are_the_planners_answer(name: str, gb: int) -> None:
    p = preset(name)
    est = memory.estimate(p, gpu_mem_gb=gb)
    assert est.fits and est.size_supported and not memory.rung_warnings(p)
    found = memory.fit_levers(p, gpu_mem_gb=gb)
    assert found is not None
    for key in LEVERS:
        assert found.settings[f"liveavatar.{key}"] == getattr(p.liveavatar, key), key
    assert f"{found.cost.fps:.2g}" in p.description or f"{found.cost.fps:.3g}" in p.description


def test_plan_24gb_preset_fits_and_shows_each_lever() -> None:
    result = runner.invoke(app, ["plan", "-p", "liveavatar-24gb", "--gpu-mem", "24",
                                 "--host-mem", "64"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "fits (1 GPU)" in out and "host RAM: peak" in out and "of 64.0 GB: fits" in out
    for text in ("lever resident_blocks=20: 20 of 40 blocks on the GPU",
                 "20 in pinned host memory", "lever weight storage int8",
                 "lever KV caches: on the GPU", "lever encoders: gpu",
                 "block swap 6.6 GB", "frames/s per GPU", "dit_load_bf16"):
        assert text in out, text
    short = runner.invoke(app, ["plan", "-p", "liveavatar-24gb", "--gpu-mem", "24",
                                "--host-mem", "32"])
    assert short.exit_code == 1 and "does NOT fit" in short.output


def test_plan_fit_five_24gb_cards() -> None:
    result = runner.invoke(app, ["plan", "--gpu-count", "5", "--gpu-mem", "24", "--fit",
                                 "--host-mem", "1024"])
    assert result.exit_code == 0, result.output
    assert "one single-GPU worker per card, 5 batch(es) at once" in result.output
    assert "--set liveavatar.gpus_per_run=1" in result.output
    assert "--set liveavatar.resident_blocks=" in result.output
    js = runner.invoke(app, ["plan", "--gpu-count", "5", "--gpu-mem", "24", "--fit", "--host-mem",
                             "256", "--json"])
    data = json.loads(js.stdout)
    assert data["fits"] and 1 <= data["workers"] < 5
    assert data["fps"] == pytest.approx(data["workers"] * data["fps_per_worker"], rel=0.01)
    none = runner.invoke(app, ["plan", "--gpu-mem", "12", "--fit", "--host-mem", "1024"])
    assert none.exit_code == 1 and "nothing fits" in none.output
    assert "cards alone would fit" not in none.output
    host = runner.invoke(app, ["plan", "--gpu-count", "5", "--gpu-mem", "24", "--fit",
                               "--host-mem", "32"])
    assert host.exit_code == 1 and "the cards alone would fit" in host.output
