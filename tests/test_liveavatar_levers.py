"""The memory levers (avatarcli/engines/liveavatar/levers.py) on a synthetic DiT with upstream's
block layout, on the CPU standing in for the GPU: outputs bit-identical with and without block
swap, quantised storage equal to its own dequantised reference, placement per block."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

from avatarcli.engines.liveavatar import levers as lv
from tests.synthetic_dit import LAYERS, StandinPipe, make_dit

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny matmuls on 2 shared cores: threads cost 50x here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(seed: int = 1, tokens: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, tokens, 16, generator=g).to(torch.bfloat16)
    context = torch.randn(1, 7, 32, generator=g).to(torch.bfloat16)
    return latents, context


def _run(dit: nn.Module, *, blocks: int = 3, **pipe_kw: Any) -> torch.Tensor:
    latents, context = _inputs()
    with torch.no_grad():
        return StandinPipe(dit, **pipe_kw).generate(latents, context, blocks)


def _probe(dit: nn.Module, handle: lv.BlockSwap) -> list[tuple[int, list[str]]]:
    """Placement of every block as each block starts (hooks run after the swap's own)."""
    seen: list[tuple[int, list[str]]] = []
    for i, block in enumerate(dit.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, handle.placement())))
    return seen


def test_swapped_indices_spread_and_bounds() -> None:
    assert lv.swapped_indices(40, 40) == []
    assert lv.swapped_indices(40, 0) == list(range(40))
    spread = lv.swapped_indices(40, 30)
    assert len(spread) == 10 and spread == sorted(set(spread))
    assert max(b - a for a, b in itertools.pairwise(spread)) == 4  # evenly spread
    with pytest.raises(ValueError):
        lv.swapped_indices(40, 41)


@pytest.mark.parametrize(("resident", "prefetch"), [(0, 1), (3, 1), (4, 2), (2, 0)])
def test_block_swap_is_bit_identical_and_never_whole_on_the_device(resident: int,
                                                                   prefetch: int) -> None:
    reference = _run(make_dit())
    dit = make_dit()
    handle = lv.apply_block_swap(dit.blocks, resident=resident, device=CPU, prefetch=prefetch)
    swapped = set(handle.swapped)
    assert len(swapped) == LAYERS - resident
    assert [p == "host" for p in handle.placement()] == [i in swapped for i in range(LAYERS)]
    seen = _probe(dit, handle)
    out = _run(dit)
    assert torch.equal(out, reference)
    assert len(seen) == 3 * 4 * LAYERS  # 3 blocks x 4 steps, every DiT block ran
    in_flight = min(len(swapped), prefetch + 1)
    for i, placement in seen:
        assert placement[i] == "device"  # the running block is in
        on_device = placement.count("device")
        assert on_device <= resident + in_flight < LAYERS  # never the whole DiT
        assert sum(placement[j] == "device" for j in swapped) <= in_flight
    # after the run only the prefetched blocks of the next forward stay in
    after = handle.placement()
    assert sum(after[j] == "device" for j in swapped) == min(len(swapped), prefetch)
    forwards = 3 * 4
    assert handle.copies_in >= forwards * len(swapped) - prefetch  # each swapped block, each time


def test_swapped_blocks_ignore_their_parents_moves() -> None:
    dit = make_dit()
    handle = lv.apply_block_swap(dit.blocks, resident=4, device=CPU)
    masters = {j: [t.data_ptr() for t in dit.blocks[j].parameters()] for j in handle.swapped}
    dit.to(torch.float32)  # upstream's noise_model.to(device) in generate() goes through _apply
    for j, ptrs in masters.items():
        assert [t.data_ptr() for t in dit.blocks[j].parameters()] == ptrs
        assert all(t.dtype == torch.bfloat16 for t in dit.blocks[j].parameters())
    resident = next(i for i in range(LAYERS) if i not in handle.swapped)
    assert all(t.dtype == torch.float32 for t in dit.blocks[resident].parameters())
    handle.remove()
    assert handle.placement().count("host") == len(handle.swapped)


@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_quantised_storage_with_block_swap_equals_its_dequantised_reference(storage: str) -> None:
    reference = make_dit()
    converted = lv.quantise_linears(reference, storage, skip=lv.FP8_SKIP)
    assert lv.dequantised_copy_into(reference) == converted
    want = _run(reference)

    dit = make_dit()
    bf16_bytes = sum(t.numel() * t.element_size() for t in dit.blocks[0].parameters())
    handle = lv.place_dit(dit, resident=3, device=CPU, storage=storage)
    stored = {lv.STORAGES[1]: torch.int8, lv.STORAGES[2]: torch.float8_e4m3fn}[storage]
    assert all(isinstance(m, lv.QuantLinear) and m.qweight.dtype == stored
               for m in dit.blocks.modules() if isinstance(m, nn.Linear | lv.QuantLinear))
    assert isinstance(dit.head.head, nn.Linear) and isinstance(dit.text_embedding[0], nn.Linear)
    assert isinstance(dit.patch_embedding, lv.QuantLinear)
    per_block = handle.host_bytes() / len(handle.swapped)
    assert 0.5 < per_block / bf16_bytes < 0.65  # 1-byte weights: about half the transfer
    seen = _probe(dit, handle)
    assert torch.equal(_run(dit), want)
    assert seen and all(p.count("device") < LAYERS for _, p in seen)
    assert not torch.equal(want, _run(make_dit()))  # quantisation did change the weights


@pytest.mark.parametrize(("storage", "tolerance"), [("int8", 0.005), ("fp8", 0.07)])
def test_scales_are_per_output_channel(storage: str, tolerance: float) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 32, generator=g) * torch.tensor([1e-3, 1e-2, 1.0, 10.0, 100.0, 1e3])[:, None]
    q, scale = lv.quantise(w, storage)
    assert q.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[storage]
    assert scale.shape == (6, 1)
    back = lv.dequantise(q, scale, torch.float32)
    rel = ((back - w).abs().amax(dim=1) / w.abs().amax(dim=1))
    assert bool((rel < tolerance).all()), rel  # small rows survive beside large ones


def test_kv_caches_in_host_buffers_are_moved_in_and_out_and_kept() -> None:
    reference = _run(make_dit())
    dit = make_dit()
    pipe = StandinPipe(dit)
    lv.place_kv_caches(pipe, "host", device=CPU)
    assert pipe.offload_kv_cache
    latents, context = _inputs()
    with torch.no_grad():
        first = pipe.generate(latents, context, 3)
        second = pipe.generate(latents, context, 3)
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert len(pipe.moves) == 2 * 3 * 4
    # every step works on a copy on the "device", never on the host buffer itself, and each
    # move-out lands in that cache's one host buffer, the same in both generate calls
    assert all(working != home for _, working, home in pipe.moves)
    homes: dict[str, set[int]] = {}
    for cache, _, home in pipe.moves:
        homes.setdefault(cache, set()).add(home)
    assert sorted(homes) == ["1", "2", "3", "4"] and all(len(h) == 1 for h in homes.values())
    assert len({next(iter(h)) for h in homes.values()}) == 4


def test_kv_caches_lost_between_steps_change_the_output() -> None:
    """The check above can fail: a move-out that drops the step's writes is visible."""
    reference = _run(make_dit())
    dit = make_dit()
    pipe = StandinPipe(dit)
    lv.place_kv_caches(pipe, "host", device=CPU)
    wrapped = pipe._move_kv_cache_to_working_gpu

    def forgetful(moved_id: Any, gpu_id: int = 0) -> None:
        if gpu_id == 0:
            wrapped(moved_id, 0)
        else:  # what a wrapper that forgot to copy back would do
            pipe.kv_cache1[str(moved_id)] = [
                {**layer, "k": torch.zeros_like(layer["k"])} for layer in pipe.kv_cache1[str(moved_id)]]
            wrapped(moved_id, gpu_id)

    pipe._move_kv_cache_to_working_gpu = forgetful
    latents, context = _inputs()
    with torch.no_grad():
        assert not torch.equal(pipe.generate(latents, context, 3), reference)


def test_kv_host_buffers_are_reused_across_generate_calls() -> None:
    pipe = StandinPipe(make_dit())
    lv.place_kv_caches(pipe, "host", device=CPU)
    seen: list[int] = []
    init = pipe._initialize_kv_cache

    def spy(*a: Any, **k: Any) -> None:
        init(*a, **k)
        assert pipe.kv_cache1 is not None
        seen.append(pipe.kv_cache1["1"][0]["k"].data_ptr() if "1" in pipe.kv_cache1 else 0)

    pipe._initialize_kv_cache = spy
    latents, context = _inputs()
    with torch.no_grad():
        pipe.generate(latents, context, 2)
        pipe.generate(latents, context, 2)
    firsts = [p for p in seen if p]
    assert len(firsts) == 8 and len(set(firsts)) == 1  # the same host buffer both times


def test_kv_on_gpu_is_upstreams_default() -> None:
    pipe = StandinPipe(make_dit(), offload_kv_cache=True)
    method = pipe._move_kv_cache_to_working_gpu
    lv.place_kv_caches(pipe, "gpu")
    assert pipe.offload_kv_cache is False
    assert pipe._move_kv_cache_to_working_gpu == method
    with pytest.raises(ValueError):
        lv.place_kv_caches(pipe, "disk")


def test_encoders_stay_on_the_cpu() -> None:
    pipe = StandinPipe(make_dit())
    lv.encoders_on_cpu(pipe)
    assert pipe.t5_cpu
    model = pipe.audio_encoder.model
    moved = model.to(device=torch.device("meta"), dtype=torch.bfloat16)  # as generate() does
    assert moved is model and model.weight.device == CPU and model.weight.dtype == torch.bfloat16
    assert model.to("meta") is model and model.weight.device == CPU
    other = StandinPipe(make_dit())
    lv.encoders_on_cpu(other, audio=False)
    assert other.audio_encoder.model.to("meta").weight.device.type == "meta"


def test_dit_loaded_on_host_drops_the_device_map() -> None:
    calls: list[Any] = []

    class Base:
        @classmethod
        def from_pretrained(cls, path: str, torch_dtype: Any = None,
                            device_map: Any = None) -> tuple[type, Any]:
            calls.append(device_map)
            return cls, device_map

    class Model(Base):
        pass

    with lv.dit_loaded_on_host(Model):
        assert Model.from_pretrained("ckpt", torch_dtype=torch.bfloat16,
                                     device_map=torch.device("cuda:0")) == (Model, None)
    assert Model.from_pretrained("ckpt", device_map="cuda:0") == (Model, "cuda:0")
    assert "from_pretrained" not in Model.__dict__
    assert calls == [None, "cuda:0"]


def test_apply_levers_from_the_preset_keys_on_the_standin_pipeline() -> None:
    reference = _run(make_dit())
    pipe = StandinPipe(make_dit())
    handle = lv.apply_levers(pipe, resident_blocks=2, weight_storage="bf16", prefetch_blocks=1,
                             offload_kv_cache=True, encoders="cpu", device=CPU)
    assert handle is not None and len(handle.swapped) == LAYERS - 2
    assert pipe.offload_kv_cache and pipe.t5_cpu
    seen = _probe(pipe.noise_model, handle)
    latents, context = _inputs()
    with torch.no_grad():
        out = pipe.generate(latents, context, 3)
    assert torch.equal(out, reference)
    assert seen and all(p.count("device") <= 2 + 2 for _, p in seen)
    plain = StandinPipe(make_dit())
    assert lv.apply_levers(plain, device=CPU) is None and not plain.offload_kv_cache
    with pytest.raises(ValueError):
        lv.apply_levers(plain, encoders="disk", device=CPU)


def test_block_swap_under_torch_compile_as_upstream_compiles_the_forward() -> None:
    """Upstream compiles the DiT's whole forward (ENABLE_COMPILE=true): the swap's hooks must
    still run each call (eager; dynamo's 'eager' backend here, no C++ compiler needed)."""
    reference = _run(make_dit())
    dit = make_dit()
    handle = lv.apply_block_swap(dit.blocks, resident=3, device=CPU)
    dit.forward = torch.compile(dit.forward, backend="eager")  # type: ignore[method-assign]
    out = _run(dit)
    assert torch.equal(out, reference)
    forwards = 3 * 4
    assert handle.copies_in == forwards * len(handle.swapped) + 1  # + the next forward's prefetch
    assert sum(p == "device" for p in handle.placement()) == 3 + 1
