"""Check the memory planner (avatarcli.engines.liveavatar.memory) against a real GPU on a few DiT-shaped layers.

    python scripts/bench_memory_gpu.py [--preset liveavatar-80gb] [--layers 2]
                                       [--width W --height H] [--set KEY=VALUE ...]

Builds LAYERS transformer blocks with LiveAvatar's DiT shapes (dim 5120, FFN 13824, 40 heads of
128, self-attention + cross-attention + FFN, bf16 weights), gives each layer a KV cache the size
of one per-step cache (one clip + the cond cache) and a text cross-attention cache, then runs
one denoising forward under torch.no_grad() at the preset's token count, the way upstream's
causal block does it: fp32 modulation maps and residual, float64 RoPE, the cache concatenated
with the cond cache, torch.nn.functional.scaled_dot_product_attention.

It prints the planner's per-layer-scaled estimate (memory.per_layer_estimate) next to what
torch.cuda reports for the same configuration. Exit status 2 without a CUDA GPU.

    python scripts/bench_memory_gpu.py --levers [--layers 8] [--storage bf16|int8|fp8]
                                       [--resident 8,6,4,2,0] [--steps 3] [--prefetch 1]

--levers runs the resident worker's block swap (avatarcli/engines/liveavatar/levers.py) over
the LAYERS-block slice: the blocks are built in (pinned) host memory, converted to STORAGE,
then K of them placed on the GPU and the rest streamed in one block ahead. Per K it prints the
peak torch.cuda.max_memory_allocated over the forwards, the planner's estimate for the same
slice, and the time per block step against all blocks resident, plus the measured pinned
host-to-GPU copy rate (memory.PCIE_GIB_PER_S assumes 22 GiB/s). Targets (issue 14): estimate
within 15% of measured; K/LAYERS >= 1/2 (K >= 20 of 40) within 1.3x of all-resident.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from avatarcli import presets
from avatarcli.engines.liveavatar import memory
from avatarcli.engines.liveavatar.options import options_of

if TYPE_CHECKING:
    import torch

GIB = float(2**30)
BENCH_DEVICE = "cuda"  # --levers' device (a CPU smoke run of the script code patches it)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="liveavatar-80gb", help="LiveAvatar preset name or file")
    ap.add_argument("--layers", type=int, default=2, help="DiT blocks to build (default 2)")
    ap.add_argument("--width", type=int, default=None, help="frame width (default: area key)")
    ap.add_argument("--height", type=int, default=None, help="frame height (default: area key)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="preset override, as `avatar --set` (repeatable)")
    ap.add_argument("--levers", action="store_true", help="benchmark block swap per K")
    ap.add_argument("--storage", default="bf16", choices=memory.WEIGHT_STORAGES,
                    help="--levers: weight storage (bf16 compute)")
    ap.add_argument("--resident", default="", help="--levers: K values, e.g. 8,6,4,2,0 "
                    "(default: LAYERS down to 0 in steps of LAYERS/4)")
    ap.add_argument("--steps", type=int, default=3, help="--levers: timed forwards per K")
    ap.add_argument("--prefetch", type=int, default=1, help="--levers: blocks prefetched")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error("--layers must be at least 1")
    if args.levers and args.layers < 2:
        ap.error("--levers needs at least 2 layers")
    return args


def build_block(dim: int, ffn: int, device: Any, dtype: Any) -> torch.nn.Module:
    """One block with exactly memory.dit_block_params() parameters."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            kw: dict[str, Any] = {"device": device, "dtype": dtype}
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, **kw) for _ in range(4))
            self.cq, self.ck, self.cv, self.co = (nn.Linear(dim, dim, **kw) for _ in range(4))
            self.norms = nn.Parameter(torch.ones(4, dim, **kw))  # RMS q/k of both attentions
            self.norm3 = nn.LayerNorm(dim, elementwise_affine=True, **kw)
            self.ffn = nn.Sequential(nn.Linear(dim, ffn, **kw), nn.GELU(approximate="tanh"),
                                     nn.Linear(ffn, dim, **kw))
            self.modulation = nn.Parameter(torch.zeros(1, 6, dim, **kw))

    block = Block().eval().requires_grad_(False)
    if sum(p.numel() for p in block.parameters()) != memory.dit_block_params():
        raise AssertionError("synthetic block does not match memory.dit_block_params()")
    return block


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE as upstream applies it: through float64/complex128, back to the input dtype."""
    import torch

    b, s, n, d = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, s, n, d // 2, 2))
    return torch.view_as_real(xc * freqs[:s]).flatten(3).float().to(x.dtype)


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    import torch

    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight


def block_forward(blk: Any, x: torch.Tensor, e: torch.Tensor, cache: dict[str, torch.Tensor],
                  freqs: torch.Tensor, heads: int) -> torch.Tensor:
    """One streaming denoising forward of a block (shapes and dtypes as upstream's)."""
    import torch
    import torch.nn.functional as F

    b, length, dim = x.shape
    hd = dim // heads
    mods = [(blk.modulation[:, i].float() + e[:, i]).unsqueeze(1).expand(b, length, dim)
            .contiguous() for i in range(6)]  # upstream: repeat_interleave to [B, L, dim] fp32
    xf = x.float()
    h = (F.layer_norm(xf, (dim,)) * (1 + mods[1]) + mods[0]).to(x.dtype)
    q = rope(rms(blk.q(h), blk.norms[0]).view(b, length, heads, hd), freqs)
    k = rope(rms(blk.k(h), blk.norms[1]).view(b, length, heads, hd), freqs)
    v = blk.v(h).view(b, length, heads, hd)
    cache["k"][:, -length:] = k  # the block's slots of the rolling cache
    cache["v"][:, -length:] = v
    keys = torch.cat([cache["k"], rope(cache["cond_k"], freqs)], dim=1)
    values = torch.cat([cache["v"], cache["cond_v"]], dim=1)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2),
                                       values.transpose(1, 2)).transpose(1, 2).flatten(2)
    xf = xf + blk.o(y).float() * mods[2]
    h = blk.norm3(xf.to(x.dtype))
    cq = rms(blk.cq(h), blk.norms[2]).view(b, length, heads, hd)
    y = F.scaled_dot_product_attention(cq.transpose(1, 2), cache["ctx_k"].transpose(1, 2),
                                       cache["ctx_v"].transpose(1, 2)).transpose(1, 2).flatten(2)
    xf = xf + blk.co(y).float()
    h = (F.layer_norm(xf, (dim,)) * (1 + mods[4]) + mods[3]).to(x.dtype)
    xf = xf + blk.ffn(h).float() * mods[5]
    return xf.to(x.dtype)


def _step_block(inner: Any, heads: int) -> Any:
    from torch import nn

    class Step(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any, e: Any, cache: Any, freqs: Any) -> Any:
            return block_forward(self.inner, x, e, cache, freqs, heads)

    return Step()


def copy_rate_gib_s() -> float:
    """Pinned host-to-GPU copy rate, GiB/s (1 GiB, best of 3)."""
    import time

    import torch

    host = torch.empty(int(GIB), dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del host, dev
    return 1.0 / best


def run_levers(args: argparse.Namespace) -> int:
    """Block swap over a slice of real-shaped blocks: peak memory, estimate, time per K."""
    import time

    import torch

    from avatarcli.engines.liveavatar import levers as lv

    preset = presets.resolve(args.preset, presets.parse_set(args.overrides) or None).preset
    key_w, key_h = presets.parse_size(preset.size)
    w, h = args.width or key_w, args.height or key_h
    n, dim, heads, ffn = args.layers, memory.DIT_DIM, memory.DIT_HEADS, memory.DIT_FFN
    ks = ([int(k) for k in args.resident.split(",")] if args.resident
          else sorted({n, *range(n, -1, -max(1, n // 4)), 0}, reverse=True))
    if n not in ks:
        ks = [n, *ks]  # the all-resident baseline
    cond_slots = memory.COND_CACHE_TOKENS_SINGLE
    kv_len, q_len = memory.kv_tokens(preset.infer_frames, w, h), memory.query_tokens(w, h)
    dev, bf16 = torch.device(BENCH_DEVICE), torch.bfloat16
    rate = copy_rate_gib_s()
    print(f"{torch.cuda.get_device_name()}: {n} blocks of dim {dim}, ffn {ffn}, {heads} heads, "
          f"{args.storage} storage, prefetch {args.prefetch}; {w}x{h}, {preset.infer_frames} "
          f"frames/clip: {q_len} query tokens, {kv_len} + {cond_slots} cached per layer; pinned "
          f"copy rate {rate:.1f} GiB/s (planner assumes {memory.PCIE_GIB_PER_S:g})")
    with torch.no_grad():
        host_blocks = []
        for _ in range(n):  # built on the host, converted there: never whole on the GPU
            blk = build_block(dim, ffn, torch.device("cpu"), bf16)
            lv.quantise_linears(blk, args.storage)
            host_blocks.append(_step_block(blk, heads))
        angles = torch.rand(max(q_len, cond_slots), 1, dim // heads // 2, device=dev,
                            dtype=torch.float64)
        freqs = torch.polar(torch.ones_like(angles), angles)
        x0 = torch.randn(1, q_len, dim, device=dev, dtype=bf16)
        e = torch.randn(1, 6, dim, device=dev, dtype=torch.float32)
        print(f"{'K':>4}{'swapped':>9}{'peak GiB':>10}{'plan GiB':>10}{'plan/meas':>10}"
              f"{'ms/block':>10}{'vs all':>8}  targets")
        baseline = None
        for k in ks:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            handle = lv.apply_block_swap(host_blocks, resident=k, device=dev,
                                         prefetch=args.prefetch)
            caches = []
            for _ in host_blocks:
                shape = (1, kv_len, heads, dim // heads)
                cond_shape = (1, cond_slots, heads, dim // heads)
                caches.append({
                    "k": torch.zeros(shape, device=dev, dtype=bf16),
                    "v": torch.zeros(shape, device=dev, dtype=bf16),
                    "cond_k": torch.randn(cond_shape, device=dev, dtype=bf16),
                    "cond_v": torch.randn(cond_shape, device=dev, dtype=bf16),
                    "ctx_k": torch.randn(1, memory.TEXT_TOKENS, heads, dim // heads,
                                         device=dev, dtype=bf16),
                    "ctx_v": torch.randn(1, memory.TEXT_TOKENS, heads, dim // heads,
                                         device=dev, dtype=bf16),
                })

            def forward(caches: list[dict[str, Any]]) -> None:
                x = x0
                for blk, cache in zip(host_blocks, caches, strict=True):
                    x = blk(x, e, cache, freqs)

            forward(caches)  # warm-up (and the first prefetch)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                forward(caches)
            torch.cuda.synchronize()
            per_block = (time.perf_counter() - t0) / (args.steps * n)
            peak = (torch.cuda.max_memory_allocated() - base) / GIB
            plan = sum(memory.per_layer_estimate(preset, n, width=w, height=h, resident=k,
                                                 storage=args.storage,
                                                 prefetch=args.prefetch).values())
            baseline = per_block if k == n else baseline
            ratio = per_block / baseline if baseline else float("nan")
            marks = [f"estimate {'ok' if abs(plan / peak - 1) <= 0.15 else 'MISSED'} (15%)"]
            if 2 * k >= n:
                marks.append(f"time {'ok' if ratio <= 1.3 else 'MISSED'} (1.3x)")
            print(f"{k:>4}{n - k:>9}{peak:10.2f}{plan:10.2f}{plan / peak:10.2f}"
                  f"{per_block * 1e3:10.1f}{ratio:8.2f}  {', '.join(marks)}")
            handle.remove()
            del caches
            for blk in host_blocks:  # back to the host for the next K
                blk.__dict__.pop("_apply", None)
                blk.to("cpu")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        print("bench_memory_gpu: needs a CUDA GPU (and torch)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_memory_gpu: needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2

    preset = presets.resolve(args.preset, presets.parse_set(args.overrides) or None).preset
    if preset.engine != "liveavatar":
        print(f"bench_memory_gpu: {args.preset} is not a liveavatar preset", file=sys.stderr)
        return 1
    if args.levers:
        return run_levers(args)
    plan = memory.per_layer_estimate(preset, args.layers, width=args.width, height=args.height)
    key_w, key_h = presets.parse_size(preset.size)
    w, h = args.width or key_w, args.height or key_h
    dim, heads, ffn = memory.DIT_DIM, memory.DIT_HEADS, memory.DIT_FFN
    multi = options_of(preset).gpus_per_run == memory.GPUS_MULTI
    cond_slots = memory.COND_CACHE_TOKENS_MULTI if multi else memory.COND_CACHE_TOKENS_SINGLE
    kv_len = memory.kv_tokens(preset.infer_frames, w, h)
    q_len = memory.query_tokens(w, h)
    dev, bf16 = torch.device("cuda"), torch.bfloat16

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        blocks: list[Any] = [build_block(dim, ffn, dev, bf16) for _ in range(args.layers)]
        after_weights = torch.cuda.memory_allocated()
        context = torch.randn(1, memory.TEXT_TOKENS, dim, device=dev, dtype=bf16)
        caches: list[dict[str, torch.Tensor]] = []
        for blk in blocks:
            shape = (1, kv_len, heads, dim // heads)
            cond_shape = (1, cond_slots, heads, dim // heads)
            caches.append({
                "k": torch.zeros(shape, device=dev, dtype=bf16),
                "v": torch.zeros(shape, device=dev, dtype=bf16),
                "cond_k": torch.randn(cond_shape, device=dev, dtype=bf16),
                "cond_v": torch.randn(cond_shape, device=dev, dtype=bf16),
                "ctx_k": blk.ck(context).view(1, -1, heads, dim // heads),
                "ctx_v": blk.cv(context).view(1, -1, heads, dim // heads),
            })
        del context
        after_caches = torch.cuda.memory_allocated()
        angles = torch.rand(max(q_len, cond_slots), 1, dim // heads // 2, device=dev,
                            dtype=torch.float64)
        freqs = torch.polar(torch.ones_like(angles), angles)
        x = torch.randn(1, q_len, dim, device=dev, dtype=bf16)
        e = torch.randn(1, 6, dim, device=dev, dtype=torch.float32)
        before_forward = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for blk, cache in zip(blocks, caches, strict=True):
            x = block_forward(blk, x, e, cache, freqs, heads)
        torch.cuda.synchronize()
        peak_forward = torch.cuda.max_memory_allocated()

    measured = {
        "weights": (after_weights - base) / GIB,
        "kv_cache + cross_attn_cache": (after_caches - after_weights) / GIB,
        "activations": (peak_forward - before_forward) / GIB,
    }
    planned = {
        "weights": plan["weights"],
        "kv_cache + cross_attn_cache": plan["kv_cache"] + plan["cross_attn_cache"],
        "activations": plan["activations"],
    }
    print(f"{torch.cuda.get_device_name()}: preset {args.preset}, {w}x{h}, "
          f"{preset.infer_frames} frames/clip, {args.layers} layers; "
          f"{q_len} query tokens, {kv_len} + {cond_slots} cached tokens per layer")
    print(f"{'component':<30}{'planned GiB':>12}{'measured GiB':>14}{'ratio':>8}")
    for name, gb in planned.items():
        got = measured[name]
        ratio = f"{got / gb:8.2f}" if gb > 0 else f"{'-':>8}"
        print(f"{name:<30}{gb:12.3f}{got:14.3f}{ratio}")
    total_plan = sum(planned.values())
    total_got = (peak_forward - base) / GIB
    print(f"{'peak (max_memory_allocated)':<30}{total_plan:12.3f}{total_got:14.3f}"
          f"{total_got / total_plan:8.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
