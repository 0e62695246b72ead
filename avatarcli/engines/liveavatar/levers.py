"""Memory levers for LiveAvatar's 14B DiT on one GPU: block swap, quantised weight storage,
KV-cache placement, encoders on the CPU.

SELF-CONTAINED: imports only torch and the standard library. It is shipped beside
the resident-worker adapter and runs in LiveAvatar's own Python environment, where avatarcli
is not installed. Nothing here imports upstream; the functions take upstream's objects (the
`WanS2V` pipeline, its `noise_model.blocks`) and call or wrap their methods.

API (all placement is explicit; "device" may be a CPU device, then streams are no-ops and the
"device" copies are plain clones, so CPU tests can check placement and bit-exact outputs):

- `quantise_linears(module, storage, *, skip=(), compute_dtype=torch.bfloat16) -> int`
  replaces every `nn.Linear` below `module` (names containing a `skip` string excepted) with a
  `QuantLinear` that STORES its weight as int8 or float8_e4m3fn with one fp32 scale per output
  channel and computes in `compute_dtype`, dequantising the weight per call (any GPU, any CPU).
  storage "bf16" changes nothing. Returns how many layers were converted. Do it on the HOST.
- `QuantLinear.dequantised_linear()`: the plain `nn.Linear` a QuantLinear computes (reference).
- `apply_block_swap(blocks, *, resident, device, prefetch=1, pin=None) -> BlockSwap`
  keeps `resident` of the blocks on `device` and the others in (pinned, for CUDA) host memory;
  each non-resident block is copied in on a side CUDA stream `prefetch` swapped blocks ahead
  of its use (forward pre-hooks; CUDA events order the streams) and released after its
  forward. The swapped blocks ignore `.to()/.cuda()/.cpu()` of their parent, so upstream's
  `noise_model.to(device)` moves only the rest. `BlockSwap.placement()` says where each block
  is now; `BlockSwap.remove()` undoes the hooks (the blocks stay where they are).
- `place_dit(model, *, resident, device, storage="bf16", prefetch=1, skip=FP8_SKIP)`:
  the whole recipe on a model LOADED ON THE HOST: convert storage block by block, move all but
  the blocks to `device`, then `apply_block_swap(model.blocks, ...)`. The DiT is never whole on
  the device.
- `dit_loaded_on_host(model_cls)`: context manager; while it is open
  `model_cls.from_pretrained(..., device_map=X)` loads on the CPU (the device_map is dropped), so
  `WanS2V(...)`, which loads the DiT with `device_map=self.device`, builds it in host memory.
- `place_kv_caches(pipe, where, *, device=None)`: "gpu" is upstream's default (the four per-step
  caches on the GPU); "host" sets `pipe.offload_kv_cache = True` and wraps the instance's
  `_initialize_kv_cache` / `_move_kv_cache_to_working_gpu` so the caches live in PINNED host
  buffers (reused across generate calls) and move with non_blocking copies.
- `encoders_on_cpu(pipe, *, text=True, audio=True)`: T5 through upstream's own `t5_cpu`; the
  wav2vec2 model ignores the device in later `.to()` calls (it stays on the CPU; dtype kept).
- `apply_levers(pipe, *, resident_blocks, weight_storage, prefetch_blocks, offload_kv_cache,
  encoders, device=None) -> BlockSwap | None`: all of the above from the preset's
  `liveavatar.*` keys of the same names, on a built `WanS2V`.

Order in the adapter: build `WanS2V(...)` inside `with dit_loaded_on_host(CausalWanModel_S2V):`
(and with `init_on_cpu=True`, upstream's default); attach and merge the LoRA as upstream's script
does (on the host); with `fp8: true` run upstream's `replace_linear_with_scaled_fp8` (on the
host); then `apply_levers(pipe, ...)`; then `generate` per batch. Upstream's own
`noise_model.to(device)` calls in generate() then move only the root and the resident blocks.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FP8_SKIP", "STORAGES", "BlockSwap", "QuantLinear", "apply_block_swap", "apply_levers",
           "dequantise", "dit_loaded_on_host", "encoders_on_cpu", "place_dit", "place_kv_caches",
           "quantise", "quantise_linears", "swapped_indices"]

STORAGES = ("bf16", "int8", "fp8")
# Linear layers upstream keeps in bf16 under --fp8 (minimal_inference/s2v_streaming_interact.py).
FP8_SKIP = ("text_embedding", "time_embedding", "time_projection", "head.head",
            "casual_audio_encoder.encoder.final_linear")

_QMAX = {"int8": 127.0, "fp8": 448.0}  # torch.finfo(torch.float8_e4m3fn).max == 448


# ------------------------------------------------------------------------------------------
# Quantised weight storage, bf16 compute.
# ------------------------------------------------------------------------------------------
def quantise(weight: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored weight, fp32 scale per output channel [out, 1]) of a 2-D weight."""
    if storage not in _QMAX:
        raise ValueError(f"storage must be int8 or fp8, got {storage!r}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    scale = amax / _QMAX[storage]
    scaled = w / scale
    if storage == "int8":
        q = scaled.round().clamp(-127, 127).to(torch.int8)
    else:
        q = scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale


def dequantise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The compute-dtype weight a stored weight stands for (fp32 product, then one rounding)."""
    return (q.float() * scale).to(dtype)


class QuantLinear(nn.Module):
    """A Linear whose weight is stored as int8/fp8 with per-output-channel scales (buffers
    `qweight`, `scale`) and dequantised to `compute_dtype` at every call."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, storage: str,
                    compute_dtype: torch.dtype = torch.bfloat16) -> QuantLinear:
        q, scale = quantise(linear.weight, storage)
        bias = None if linear.bias is None else linear.bias.to(compute_dtype)
        return cls(q, scale, bias, compute_dtype)

    qweight: torch.Tensor
    scale: torch.Tensor

    def weight_for_compute(self) -> torch.Tensor:
        return dequantise(self.qweight, self.scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_for_compute(), self.bias)

    def dequantised_linear(self) -> nn.Linear:
        """The plain Linear this layer computes: the reference for tests and checks."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.qweight.device, dtype=self.compute_dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_for_compute())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"storage={self.qweight.dtype}, compute={self.compute_dtype}")


def quantise_linears(module: nn.Module, storage: str, *, skip: Sequence[str] = (),
                     compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace the nn.Linear layers below `module` by QuantLinear (see module doc)."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if storage == "bf16":
        return 0
    targets = [(name, mod) for name, mod in module.named_modules()
               if isinstance(mod, nn.Linear) and not any(s in name for s in skip)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, QuantLinear.from_linear(lin, storage, compute_dtype))
    return len(targets)


def dequantised_copy_into(module: nn.Module) -> int:
    """Replace every QuantLinear below `module` by its dequantised nn.Linear (a reference
    model for tests: same compute, plain weights). Returns how many were replaced."""
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, QuantLinear)]
    for name, q in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, q.dequantised_linear())
    return len(targets)


# ------------------------------------------------------------------------------------------
# Block swap.
# ------------------------------------------------------------------------------------------
def swapped_indices(n: int, resident: int) -> list[int]:
    """Which of n blocks stream from the host when `resident` stay: spread evenly, so each
    copy has the compute of the resident blocks between two swapped ones to hide behind."""
    if not 0 <= resident <= n:
        raise ValueError(f"resident must be within [0, {n}], got {resident}")
    m = n - resident
    return sorted({int((j + 0.5) * n / m) for j in range(m)}) if m else []


def _tensor_slots(block: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(module, name, is_parameter) for every real (non-meta) tensor of `block`."""
    slots = []
    for mod in block.modules():
        for name, p in mod._parameters.items():
            if p is not None and p.device.type != "meta":
                slots.append((mod, name, True))
        for name, b in mod._buffers.items():
            if b is not None and b.device.type != "meta":
                slots.append((mod, name, False))
    return slots


def _get(slot: tuple[nn.Module, str, bool]) -> torch.Tensor:
    mod, name, is_param = slot
    t = mod._parameters[name] if is_param else mod._buffers[name]
    assert t is not None
    return t


def _set(slot: tuple[nn.Module, str, bool], value: torch.Tensor) -> None:
    mod, name, is_param = slot
    if is_param:
        p = mod._parameters[name]
        assert p is not None
        p.data = value
    else:
        mod._buffers[name] = value


def _eager(hook: Callable[..., None]) -> Callable[..., None]:
    """Hooks run eagerly even inside upstream's torch.compile'd forward (ENABLE_COMPILE=true):
    dynamo breaks the graph around them instead of tracing stream and placement changes.
    Not yet run on a GPU with compile on: ENABLE_COMPILE=false is the tested setting."""
    compiler = getattr(torch, "compiler", None)
    return compiler.disable(hook) if compiler is not None else hook


def _ignore_moves(self: nn.Module, fn: Callable[..., Any], recurse: bool = True) -> nn.Module:
    return self  # the BlockSwap owns this block's placement


class _Swapped:
    """One streamed block: its host masters and, while loaded, its device copies."""

    def __init__(self, block: nn.Module, pin: bool) -> None:
        self.slots = _tensor_slots(block)
        self.host: list[torch.Tensor] = []
        for slot in self.slots:
            t = _get(slot).detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if pin and not t.is_pinned():
                t = t.pin_memory()
            self.host.append(t)
            _set(slot, t)
        self.loaded = False
        self.event: Any = None  # CUDA event recorded after the copy-in


class BlockSwap:
    """Handle of `apply_block_swap`: hooks, host masters, the side stream."""

    def __init__(self, blocks: Iterable[nn.Module], *, resident: int, device: Any,
                 prefetch: int = 1, pin: bool | None = None) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch = prefetch
        pin = self.cuda if pin is None else pin
        self.swapped = swapped_indices(len(self.blocks), resident)
        swapped = set(self.swapped)
        self.stream: Any = torch.cuda.Stream(self.device) if self.cuda else None
        self.state: dict[int, _Swapped] = {}
        self.copies_in = 0  # how many block copies were issued (a measure for tests/benchmarks)
        for i, block in enumerate(self.blocks):
            if i in swapped:  # host first, before anything else touches the device
                self.state[i] = _Swapped(block, pin)
                block._apply = types.MethodType(_ignore_moves, block)  # type: ignore[method-assign]
        for i, block in enumerate(self.blocks):
            if i not in swapped:
                block.to(self.device)
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(_eager(self._pre_hook(i))))
            self._handles.append(block.register_forward_hook(_eager(self._post_hook(i))))

    # -- copies --------------------------------------------------------------------------
    def _copy_in(self, i: int) -> None:
        st = self.state[i]
        if st.loaded:
            return
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with ctx:
            for slot, host in zip(st.slots, st.host, strict=True):
                _set(slot, host.to(self.device, non_blocking=True, copy=True))
            if self.cuda:
                st.event = torch.cuda.Event()
                st.event.record(self.stream)
        st.loaded = True
        self.copies_in += 1

    def _release(self, i: int) -> None:
        st = self.state[i]
        if not st.loaded:
            return
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        for slot, host in zip(st.slots, st.host, strict=True):
            if compute is not None:  # allocated on the side stream, read on the compute stream
                _get(slot).record_stream(compute)
            _set(slot, host)
        st.loaded = False
        st.event = None

    def _next_swapped(self, i: int) -> list[int]:
        """The next `prefetch` swapped blocks after block i (wrapping to the next forward)."""
        if not self.swapped or self.prefetch == 0:
            return []
        after = [j for j in self.swapped if j > i] + [j for j in self.swapped if j <= i]
        return [j for j in after if j != i][: self.prefetch]

    def _pre_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if i in self.state:
                self._copy_in(i)  # no-op when prefetched
                ev = self.state[i].event
                if ev is not None:
                    torch.cuda.current_stream(self.device).wait_event(ev)
            for j in self._next_swapped(i):
                self._copy_in(j)
        return hook

    def _post_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if i in self.state:
                self._release(i)
        return hook

    # -- introspection -------------------------------------------------------------------
    def placement(self) -> list[str]:
        """"device" or "host" per block, read from the tensors themselves: a swapped block is
        on the host while its tensors ARE its host masters, resident blocks by their device."""
        out = []
        for i, block in enumerate(self.blocks):
            if i in self.state:
                st = self.state[i]
                on_host = all(_get(s).data_ptr() == h.data_ptr()
                              for s, h in zip(st.slots, st.host, strict=True))
                out.append("host" if on_host else "device")
            else:
                devs = {t.device for t in [*block.parameters(), *block.buffers()]
                        if t.device.type != "meta"}
                out.append("device" if devs <= {self.device} or not devs else "host")
        return out

    def host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for st in self.state.values() for h in st.host)

    def remove(self) -> None:
        """Drop the hooks and release every loaded block (they stay swapped out)."""
        for i in list(self.state):
            self._release(i)
        for h in self._handles:
            h.remove()
        self._handles = []


def apply_block_swap(blocks: Iterable[nn.Module], *, resident: int, device: Any,
                     prefetch: int = 1, pin: bool | None = None) -> BlockSwap:
    """Keep `resident` blocks on `device`, stream the rest from host memory (module doc)."""
    return BlockSwap(blocks, resident=resident, device=device, prefetch=prefetch, pin=pin)


def place_dit(model: nn.Module, *, resident: int, device: Any, storage: str = "bf16",
              prefetch: int = 1, skip: Sequence[str] = FP8_SKIP,
              compute_dtype: torch.dtype = torch.bfloat16) -> BlockSwap:
    """Convert a HOST-loaded DiT's storage, move all but `model.blocks` to `device`, then
    stream the blocks. Storage conversion covers every Linear outside `skip`, the blocks' and
    the rest's (upstream's --fp8 covers the same set)."""
    blocks = model.blocks
    assert isinstance(blocks, nn.ModuleList)
    for block in blocks:  # one block at a time: the host holds one extra block, not a model
        quantise_linears(block, storage, compute_dtype=compute_dtype)
    # the rest (converted blocks are QuantLinear, not nn.Linear: not converted twice)
    quantise_linears(model, storage, skip=skip, compute_dtype=compute_dtype)
    handle = apply_block_swap(blocks, resident=resident, device=device, prefetch=prefetch)
    model.to(device)  # the swapped blocks ignore this; the rest and resident blocks move
    return handle


@contextlib.contextmanager
def dit_loaded_on_host(model_cls: Any) -> Iterator[None]:
    """While open, `model_cls.from_pretrained` ignores `device_map` and loads on the CPU."""
    original = model_cls.__dict__.get("from_pretrained")
    bound = model_cls.from_pretrained

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("device_map", None)
        return bound.__func__(cls, *args, **kwargs) if hasattr(bound, "__func__") \
            else bound(*args, **kwargs)

    model_cls.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        if original is None:
            del model_cls.from_pretrained
        else:
            model_cls.from_pretrained = original


# ------------------------------------------------------------------------------------------
# KV caches.
# ------------------------------------------------------------------------------------------
_KV_NAMES = ("k", "v", "cond_k", "cond_v")


def place_kv_caches(pipe: Any, where: str, *, device: Any = None) -> None:
    """Home upstream's per-step KV caches by budget (module doc). Call once, before generate."""
    if where == "gpu":
        pipe.offload_kv_cache = False
        return
    if where != "host":
        raise ValueError(f"where must be gpu or host, got {where!r}")
    dev = torch.device(device) if device is not None else torch.device(pipe.device)
    pin = dev.type == "cuda"
    pipe.offload_kv_cache = True
    init = pipe._initialize_kv_cache
    move = pipe._move_kv_cache_to_working_gpu
    masters: dict[str, list[dict[str, torch.Tensor]]] = {}
    pool: dict[tuple[str, int, str], torch.Tensor] = {}  # pinned buffers kept across generates

    def initialize(*args: Any, **kwargs: Any) -> Any:
        before = dict(pipe.kv_cache1)
        result = init(*args, **kwargs)
        synced = False
        for key, cache in pipe.kv_cache1.items():
            if before.get(key) is cache:
                continue
            per_layer = []
            for li, layer in enumerate(cache):
                homes = {}
                for name in _KV_NAMES:
                    t = layer[name]
                    buf = pool.get((key, li, name))
                    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                        buf = t.cpu().pin_memory() if pin else t.cpu().clone()
                        pool[(key, li, name)] = buf
                    else:
                        if pin and not synced:  # a copy-out into it may still be in flight
                            torch.cuda.synchronize(dev)
                            synced = True
                        buf.copy_(t)
                    layer[name] = homes[name] = buf
                per_layer.append(homes)
            masters[key] = per_layer
        return result

    def move_cache(moved_id: Any, gpu_id: int = 0) -> None:
        key = str(moved_id)
        homes = masters.get(key)
        if homes is None:  # a cache this wrapper did not create: upstream's own move
            move(moved_id, gpu_id)
            return
        cache = pipe.kv_cache1[key]
        for layer, home in zip(cache, homes, strict=True):
            for name, buf in home.items():
                if gpu_id == 0:  # in: host -> device, on the compute stream, asynchronous
                    layer[name] = buf.to(dev, non_blocking=True, copy=True)
                elif layer[name] is not buf:  # out: back into the same pinned buffer
                    buf.copy_(layer[name], non_blocking=True)
                    layer[name] = buf

    pipe._initialize_kv_cache = initialize
    pipe._move_kv_cache_to_working_gpu = move_cache


# ------------------------------------------------------------------------------------------
# Encoders.
# ------------------------------------------------------------------------------------------
def _is_device(arg: Any) -> bool:
    if isinstance(arg, torch.device | int):
        return not isinstance(arg, bool)
    if isinstance(arg, str):
        try:
            torch.device(arg)
        except (RuntimeError, ValueError):
            return False
        return True
    return False


def _cpu_only(model: nn.Module) -> None:
    original = model.to

    def to(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("device", None)
        kept = tuple(a for a in args if not _is_device(a))
        return original(*kept, **kwargs) if kept or kwargs else model

    model.to = to  # type: ignore[method-assign]
    model.cuda = lambda *a, **k: model  # type: ignore[method-assign]
    model.cpu()


def encoders_on_cpu(pipe: Any, *, text: bool = True, audio: bool = True) -> None:
    """Keep T5 (upstream's t5_cpu) and/or wav2vec2 on the CPU for the whole run."""
    if text:
        pipe.t5_cpu = True
        pipe.text_encoder.model.cpu()
    if audio:
        _cpu_only(pipe.audio_encoder.model)


# ------------------------------------------------------------------------------------------
# All levers at once, from the preset's keys.
# ------------------------------------------------------------------------------------------
def apply_levers(pipe: Any, *, resident_blocks: int = 40, weight_storage: str = "bf16",
                 prefetch_blocks: int = 1, offload_kv_cache: bool = False,
                 encoders: str = "gpu", device: Any = None) -> BlockSwap | None:
    """Apply the preset's `liveavatar.{resident_blocks, weight_storage, prefetch_blocks,
    offload_kv_cache, encoders}` to a built pipeline whose DiT is in host memory (see the
    module doc for the order). Returns the block-swap handle, or None when every block stays
    on the device in bf16 (then the DiT is simply moved)."""
    if encoders not in ("gpu", "cpu"):
        raise ValueError(f"encoders must be gpu or cpu, got {encoders!r}")
    dev = torch.device(device) if device is not None else torch.device(pipe.device)
    model = pipe.noise_model
    handle = None
    if resident_blocks < len(model.blocks) or weight_storage != "bf16":
        handle = place_dit(model, resident=resident_blocks, device=dev, storage=weight_storage,
                           prefetch=prefetch_blocks)
    else:
        model.to(dev)
    place_kv_caches(pipe, "host" if offload_kv_cache else "gpu", device=dev)
    if encoders == "cpu":
        encoders_on_cpu(pipe)
    return handle
