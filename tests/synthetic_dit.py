"""A scaled-down stand-in of LiveAvatar's causal S2V DiT and of the pipeline methods the memory
levers wrap (written for these tests; no upstream code).

The block has upstream's layout (wan_2_2/modules/model.py WanAttentionBlock, as subclassed by
causal_model_s2v.py): norm1, self_attn {q, k, v, o, norm_q, norm_k}, norm3 (affine LayerNorm,
cross_attn_norm=True), cross_attn {q, k, v, o, norm_q, norm_k}, norm2, ffn = Sequential(Linear,
GELU(tanh), Linear), modulation [1, 6, dim]; fp32 modulation and residual, bf16 matmuls. The
self-attention writes the block's k/v into a per-layer rolling cache and attends to everything
cached so far, so a cache that is lost between steps changes the output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, FFN, LAYERS, TEXT_DIM = 64, 4, 176, 8, 32  # 5120/40/13824/40/4096, scaled down


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, d = t.shape
        return t.view(b, s, self.heads, d // self.heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).flatten(2))


class SelfAttention(Attention):
    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor], start: int) -> torch.Tensor:
        q = self.split(self.norm_q(self.q(x)))
        k = self.split(self.norm_k(self.k(x)))
        v = self.split(self.v(x))
        end = start + x.shape[1]
        cache["k"][:, start:end] = k
        cache["v"][:, start:end] = v
        keys = torch.cat([cache["cond_k"], cache["k"][:, :end]], dim=1)
        values = torch.cat([cache["cond_v"], cache["v"][:, :end]], dim=1)
        return self.attend(q, keys, values)


class CrossAttention(Attention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.split(self.norm_q(self.q(x)))
        k = self.split(self.norm_k(self.k(context)))
        return self.attend(q, k, self.split(self.v(context)))


class Block(nn.Module):
    """WanAttentionBlock's layout, scaled down."""

    def __init__(self, dim: int = DIM, ffn: int = FFN, heads: int = HEADS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-6)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor,
                cache: dict[str, torch.Tensor], start: int) -> torch.Tensor:
        mods = (self.modulation.float() + e).chunk(6, dim=1)  # fp32, [B, 1, dim] each
        h = (self.norm1(x.float()) * (1 + mods[1]) + mods[0]).to(x.dtype)
        x = x.float() + self.self_attn(h, cache, start).float() * mods[2]
        x = x + self.cross_attn(self.norm3(x.to(torch.bfloat16)), context).float()
        h = (self.norm2(x) * (1 + mods[4]) + mods[3]).to(torch.bfloat16)
        x = x + self.ffn(h).float() * mods[5]
        return x.to(torch.bfloat16)


class SyntheticDiT(nn.Module):
    """The root around the blocks: embeddings, time projection, head (names as upstream's)."""

    def __init__(self, layers: int = LAYERS) -> None:
        super().__init__()
        self.num_layers = layers
        self.patch_embedding = nn.Linear(16, DIM)
        self.text_embedding = nn.Sequential(nn.Linear(TEXT_DIM, DIM), nn.GELU(approximate="tanh"),
                                            nn.Linear(DIM, DIM))
        self.time_embedding = nn.Sequential(nn.Linear(8, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(DIM, 6 * DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Module()
        self.head.head = nn.Linear(DIM, 16)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                kv_cache: list[dict[str, torch.Tensor]], start: int) -> torch.Tensor:
        x = self.patch_embedding(latents)
        e = self.time_projection(self.time_embedding(t)).float().view(-1, 6, DIM)
        ctx = self.text_embedding(context)
        for idx, block in enumerate(self.blocks):
            x = block(x, e, ctx, kv_cache[idx], start)
        return self.head.head(x)


def make_dit(seed: int = 0, layers: int = LAYERS) -> SyntheticDiT:
    torch.manual_seed(seed)
    return SyntheticDiT(layers).to(torch.bfloat16).eval().requires_grad_(False)


class StandinPipe:
    """The parts of upstream's WanS2V the levers touch: t5_cpu / text_encoder / audio_encoder,
    offload_kv_cache, kv_cache1 and the two KV methods with upstream's signatures, and a
    denoising loop shaped like generate()'s (four per-step caches, each moved in before its
    step's forward and out after it). Device: CPU (the tests' stand-in for the GPU)."""

    COND = 5  # cond tokens (upstream: 2800)

    def __init__(self, dit: SyntheticDiT, *, offload_kv_cache: bool = False) -> None:
        self.device = torch.device("cpu")
        self.noise_model = dit
        self.offload_kv_cache = offload_kv_cache
        self.t5_cpu = False
        self.text_encoder = types_ns(model=nn.Linear(4, 4))
        self.audio_encoder = types_ns(model=nn.Linear(4, 4))
        self.kv_cache1: dict[str, Any] | None = None
        # (cache, data_ptr of layer 0's k during its step, data_ptr after the move out)
        self.moves: list[tuple[str, int, int]] = []

    def _initialize_kv_cache(self, batch_size: int, dtype: torch.dtype, device: Any,
                             gpu_id: int, kv_cache_size: int = 13500) -> None:
        assert self.kv_cache1 is not None
        heads, hd = HEADS, DIM // HEADS
        self.kv_cache1[str(gpu_id)] = [
            {name: torch.zeros([batch_size, size, heads, hd], dtype=dtype)
             for name, size in (("k", kv_cache_size), ("v", kv_cache_size),
                                ("cond_k", self.COND), ("cond_v", self.COND))}
            | {"cond_end": torch.tensor([0])}
            for _ in range(self.noise_model.num_layers)]

    def _move_kv_cache_to_working_gpu(self, moved_id: int, gpu_id: int = 0) -> None:
        assert self.kv_cache1 is not None
        for layer in self.kv_cache1[str(moved_id)]:
            for name in ("k", "v", "cond_k", "cond_v"):
                layer[name] = layer[name].to(self.device)

    def generate(self, latents: torch.Tensor, context: torch.Tensor, blocks: int) -> torch.Tensor:
        """blocks x 4 steps; each step's forward uses its own cache (gpu_id 1..4)."""
        tokens = latents.shape[1]
        self.kv_cache1 = {}
        for gpu_id in range(1, 5):
            self._initialize_kv_cache(1, torch.bfloat16, None, gpu_id, tokens * blocks)
        outs = []
        for b in range(blocks):
            x = latents + b
            for step in range(1, 5):
                self._move_kv_cache_to_working_gpu(step)
                cache = self.kv_cache1[str(step)]
                working = cache[0]["k"].data_ptr()
                t = torch.full((1, 8), float(step), dtype=torch.bfloat16)
                x = x - 0.25 * self.noise_model(x, t, context, cache, b * tokens)
                self._move_kv_cache_to_working_gpu(step, step)
                home = self.kv_cache1[str(step)][0]["k"]
                self.moves.append((str(step), working, home.data_ptr()))
            outs.append(x)
        self.kv_cache1 = None
        return torch.cat(outs, dim=1)


class types_ns:  # a tiny attribute bag (upstream's encoders expose `.model`)
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
