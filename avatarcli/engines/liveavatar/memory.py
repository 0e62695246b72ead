"""GPU memory planner for the LiveAvatar engine: will a preset fit, and why (not)?

Pure arithmetic: no torch, no I/O. Every model constant and every field measurement used for
calibration lives in this module, each with its source.

Units: "GB" here means GiB (2**30 bytes), the unit torch's allocator and nvidia-smi report in
and the unit the field measurement is in (its 4.17 "GB" re-gather is exactly the FSDP root
unit's 2.24e9 bf16 parameters = 4.48e9 bytes = 4.17 GiB). A "24 GB" card is given as 24.

How upstream uses a GPU, read from Alibaba-Quark/LiveAvatar (commit 9c2c38d), is modelled as a
sequence of phases; the per-GPU peak is the largest phase:

- load: the DiT is loaded in bf16 straight onto the GPU (`from_pretrained(device_map=device)`;
  with FSDP: from the CPU, sharded unit by unit),
  the DMD LoRA is attached (PEFT adapters, fp32) and merged, and only then, with --fp8, are its
  Linear weights converted to fp8. The VAE is built on the GPU; T5 and wav2vec2 start on the CPU.
- encode_media: wav2vec2 on the GPU for the audio; the VAE encodes the reference and the 73
  motion frames.
- loaded: T5 on the GPU for the prompt (it stays there unless --offload_model or --t5_cpu).
  This is the resident set when denoising starts.
- regather (multi-GPU with FSDP only): the first DiT forward unshards the FSDP root unit.
- denoise: the DiT runs one block of 3 latent frames at a time against rolling per-step KV caches
  sized to one clip (4 of them on one GPU; one per DiT rank in the 5-GPU pipeline).
- decode / decode_inline / vae_rank: the VAE decodes one clip (or block) at a time.

Single GPU (`--single_gpu --offload_model True`): --offload_model moves T5/VAE/wav2vec2 to the
CPU while the DiT denoises (whole models, not blocks). Multi GPU (5 processes, `--num_gpus_dit 4
--enable_vae_parallel`): upstream's TPP pipeline (`causal_s2v_pipeline_tpp.py`) runs one
denoising step per DiT rank and, without --dit_fsdp (the shipped script and avatarcli's engine
never pass it), loads a FULL DiT replica on every rank, the VAE rank included. The FSDP model
(`dit_sharding="fsdp"`, or "--dit_fsdp" in liveavatar.extra_args) is kept because the field
measurement below describes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from avatarcli import presets
from avatarcli.engines.liveavatar.options import LiveAvatarOptions, options_of, with_options
from avatarcli.options import Preset
from avatarcli.presets import parse_size

GIB = 2**30

# --------------------------------------------------------------------------------------------
# Model constants. Unless noted, source: liveavatar/models/wan/wan_2_2/configs/
# wan_s2v_14B_modified.py and shared_config.py in Alibaba-Quark/LiveAvatar.
# --------------------------------------------------------------------------------------------
DIT_LAYERS = 40
DIT_DIM = 5120
DIT_FFN = 13824
DIT_HEADS = 40
DIT_HEAD_DIM = 128  # DIT_DIM / DIT_HEADS
PATCH = (1, 2, 2)  # (t, h, w) patch of the DiT
VAE_STRIDE = (4, 8, 8)  # (t, h, w) compression of the Wan2.1 VAE
LATENT_CHANNELS = 16  # Wan2.1 VAE z_dim = DiT in_dim = out_dim = cond_dim
TEXT_DIM = 4096  # WanModel_S2V text_dim (umt5-xxl width)
FREQ_DIM = 256  # timestep sinusoid width
AUDIO_DIM = 1024  # wav2vec2-large hidden size fed to the DiT's audio encoder
AUDIO_INJECT_LAYERS = 12  # audio_inject_layers = [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39]
AUDIO_TOKENS_PER_FRAME = 4  # CausalAudioEncoder num_token (model_s2v.py)
FRAMEPACK_BUCKETS = (1, 2, 16)  # FramePackMotioner zip_frame_buckets (s2v/motioner.py)
MOTION_FRAMES = 73  # transformer.motion_frames: pixel frames of motion context
FRAMES_PER_BLOCK = 3  # num_frames_per_block: latent frames per causal DiT forward
TEXT_TOKENS = 512  # text_len: upper bound of the prompt's tokens (cross-attention cache)

BF16_BYTES = 2
FP8_BYTES = 1  # torch.float8_e4m3fn (liveavatar/utils/fp8_linear.py)
FP32_BYTES = 4

# Upstream's caches (liveavatar/models/wan/causal_s2v_pipeline.py, ..._tpp.py):
KV_STEPS = 4  # single GPU: `for gpu_id in range(4)`: four per-step caches, whatever sample_steps
COND_CACHE_TOKENS_SINGLE = 2800  # cond_k/cond_v [1, 2800, 40, 128], hard-coded
COND_CACHE_TOKENS_MULTI = 3000  # TPP: [1, 3000, 40, 128], "hard-coded for 720*400 resolution"

# Multi-GPU layout (minimal_inference/s2v_streaming_interact.py asserts world_size >= 5 and
# num_gpus_dit == 4; --enable_vae_parallel puts the VAE on the fifth rank).
GPUS_MULTI = 5
DIT_GPUS_MULTI = 4

# DMD LoRA attached then merged at load (liveavatar/configs/s2v_causal_sft.yaml:
# lora_rank 128, lora_target_modules "q,k,v,o,ffn.0,ffn.2"). PEFT matches every module named
# q/k/v/o: self- and cross-attention of the 40 blocks and the 12 audio-injector attentions.
# PEFT keeps adapters in fp32 (autocast_adapter_dtype=True): assumption, not measured.
LORA_RANK = 128
LORA_BYTES = FP32_BYTES

# Text encoder umt5-xxl, encoder only (models_t5_umt5-xxl-enc-bf16.pth, ~11.4 GB): vocabulary,
# width, gated-GELU FFN width, layers, heads, per-layer relative-position buckets.
T5_VOCAB = 256384
T5_DIM = 4096
T5_FFN = 10240
T5_LAYERS = 24
T5_HEADS = 64
T5_REL_BUCKETS = 32

# Audio encoder wav2vec2-large-xlsr-53-english (~0.32B params); moved to the GPU in bf16 for the
# audio features, then back to the CPU (pipeline generate(): `.to(device, dtype=param_dtype)`).
W2V_LAYERS = 24
W2V_DIM = 1024
W2V_FFN = 4096
W2V_FRONTEND_PARAMS = 13_200_000  # conv feature extractor 4.2M + projection 0.5M + pos conv 8.4M

# Wan2.1 VAE: Wan2.1_VAE.pth is ~508 MB of fp32, i.e. ~127M params; the streaming VAE
# (inference_utils.STREAMING_VAE = True) is cast to bf16: `.to(device, dtype)`.
VAE_PARAMS = 127_000_000
# VAE working set per output pixel while decoding one latent frame (4 pixel frames) at full
# resolution: decoder widths 192 -> 96 at full resolution, ~5 live bf16 tensors x 4 frames, plus
# the causal-conv frame caches. A count from the architecture, NOT a measurement.
VAE_WORKSPACE_BYTES_PER_PIXEL = 14 * 1024

# DiT activations of one forward (no_grad, bf16 autocast), per token, counted from
# causal_model_s2v.py: 6 fp32 modulation maps [L, dim] (24*dim bytes), fp32 residual and norm
# (8*dim), bf16 norm/q/k/v (8*dim), float64 RoPE temporaries of q and k (~24*dim) = 64*dim.
ACT_BYTES_PER_TOKEN = 64 * DIT_DIM
# Per attended token: torch.cat of cached k and v with the cond cache, bf16 (2 * 2*dim).
ACT_BYTES_PER_KV_TOKEN = 4 * DIT_DIM
# Per cond token: RoPE re-applied to cond_k each forward in float64 (+complex, fp32, bf16 copies).
ACT_BYTES_PER_COND_TOKEN = 22 * DIT_DIM

# CUDA context + cuBLAS/cuDNN workspaces of one torch process: fixed cost per GPU. Assumption
# (an idle torch 2.x CUDA 12 process shows 0.4-0.8 GiB in nvidia-smi), not calibrated.
CUDA_CONTEXT_GB = 0.6

# Share of a card's nominal memory the driver lets torch see: an RTX 4090 (24 GiB) reports
# "GPU 0 has a total capacity of 23.65 GiB" in torch's out-of-memory message.
DRIVER_VISIBLE_FRACTION = 23.65 / 24.0

# --------------------------------------------------------------------------------------------
# Levers of the resident worker (avatarcli/engines/liveavatar/levers.py) and their cost.
# --------------------------------------------------------------------------------------------
# Host-to-device copy rate from PINNED memory, GiB/s. Assumption: PCIe 4.0 x16 is 31.5 GB/s
# (16 GT/s x 16 lanes x 128/130) in theory; pinned copies reach ~75% of it in practice
# (CUDA's bandwidthTest typically shows 24-26 GB/s on a 4090). Not measured on this project's
# machines: scripts/bench_memory_gpu.py prints the measured rate (replace this with it).
PCIE_GIB_PER_S = 22.0
# bf16 matmul rate of the card, TFLOPS: RTX 4090 dense bf16 with fp32 accumulate, 165.2 as
# NVIDIA's Ada whitepaper lists it (quoted from memory, not re-checked here), times an assumed
# 50% efficiency of the DiT's matmuls and attention. An assumption for ranking the levers and
# for a rough throughput; `avatar plan --tflops` overrides it for other cards.
GPU_TFLOPS = 165.2 * 0.5
# GPU memory bandwidth, GiB/s (RTX 4090: 1008 GB/s spec): dequantising a 1-byte weight to bf16
# reads 1 byte and writes 2 per weight per forward.
GPU_MEM_GIB_PER_S = 1008e9 / GIB
DEQUANT_BYTES_PER_WEIGHT = 3
# Quantised storage keeps one fp32 scale per output channel (liveavatar_levers.quantise).
SCALE_BYTES = FP32_BYTES
WEIGHT_STORAGES = ("bf16", "int8", "fp8")

Sharding = Literal["auto", "replica", "fsdp"]


# --------------------------------------------------------------------------------------------
# Field measurements: what calibrates the planner. Add a case to recalibrate or to check.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldCase:
    """A reported run: the configuration and the per-GPU figures it reported (GiB)."""

    name: str
    source: str  # where it was reported, and what it says
    size: str
    infer_frames: int
    sample_steps: int
    gpus: int
    gpu_mem_gb: float
    fp8: bool
    offload: bool
    dit_sharding: Sharding
    loaded_gb: float  # per GPU after loading, before the first DiT forward
    regather_gb: float  # what the first forward's unshard adds
    needed_gb: float  # loaded + regather: where it ran out of memory
    usable_gb: float  # what the card could actually give
    fits: bool

    def preset(self) -> Preset:
        extra = ["--dit_fsdp"] if self.dit_sharding == "fsdp" else []
        return Preset(engine="liveavatar", size=self.size, infer_frames=self.infer_frames,
                      sample_steps=self.sample_steps, offload=self.offload,
                      sections={"liveavatar": LiveAvatarOptions(gpus_per_run=self.gpus,
                                                                fp8=self.fp8, extra_args=extra)})


FIELD_CASES: tuple[FieldCase, ...] = (
    FieldCase(
        name="5x RTX 4090 (24 GB), FSDP",
        source=("http://www.mynw.cn/news/858623.html (copied on several sites), on "
                "infinite_inference_multi_gpu.sh with 5x RTX 4090: '分片后每GPU显存占用: 21.48 GB; "
                "unshard所需临时空间: +4.17 GB; 总需求峰值: 25.65 GB; 而RTX 4090实际可用显存约为: "
                "22.15 GB' - third-party text that describes FSDP sharding; upstream's script does "
                "not pass --dit_fsdp"),
        size="720*400", infer_frames=48, sample_steps=4, gpus=5, gpu_mem_gb=24.0, fp8=False,
        offload=False, dit_sharding="fsdp",
        loaded_gb=21.48, regather_gb=4.17, needed_gb=25.65, usable_gb=22.15, fits=False,
    ),
)


# --------------------------------------------------------------------------------------------
# Parameter counts, derived from the shapes above (biases and norm weights included).
# --------------------------------------------------------------------------------------------
def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _attention_linear_weights(dim: int = DIT_DIM) -> int:
    """q, k, v, o weight matrices of one attention (the fp8-eligible part)."""
    return 4 * dim * dim


def dit_block_params() -> int:
    """One transformer block: self-attn and cross-attn (q,k,v,o + RMS q/k norms), FFN,
    the affine norm before cross-attention, and the 6-way modulation vector."""
    attn = 4 * _linear(DIT_DIM, DIT_DIM) + 2 * DIT_DIM
    ffn = _linear(DIT_DIM, DIT_FFN) + _linear(DIT_FFN, DIT_DIM)
    norm3 = 2 * DIT_DIM
    modulation = 6 * DIT_DIM
    return 2 * attn + ffn + norm3 + modulation


def _dit_block_linear_weights() -> int:
    return 2 * _attention_linear_weights() + 2 * DIT_DIM * DIT_FFN


def _audio_injector_params() -> int:
    """12 audio cross-attentions (q,k,v,o + q/k norms) and their AdaLN linears (dim -> 2*dim)."""
    per = 4 * _linear(DIT_DIM, DIT_DIM) + 2 * DIT_DIM + _linear(DIT_DIM, 2 * DIT_DIM)
    return AUDIO_INJECT_LAYERS * per


def _audio_injector_linear_weights() -> int:
    return AUDIO_INJECT_LAYERS * (_attention_linear_weights() + DIT_DIM * 2 * DIT_DIM)


def dit_root_params() -> int:
    """Everything outside the 40 blocks: the FSDP root unit (shard_model wraps each block).

    Assumption, from model_s2v.py/audio_utils.py/motioner.py: patch and cond embeddings, text
    and time embeddings, the 6-way time projection, the head, the causal audio encoder
    (conv1d stack 1024 -> 5120 + final linear), the audio injector and the frame-pack motion
    projections. ~2.24e9 params: the re-gather of the field measurement.
    """
    t, h, w = PATCH
    patch_embedding = LATENT_CHANNELS * t * h * w * DIT_DIM + DIT_DIM
    cond_encoder = patch_embedding
    text_embedding = _linear(TEXT_DIM, DIT_DIM) + _linear(DIT_DIM, DIT_DIM)
    time_embedding = _linear(FREQ_DIM, DIT_DIM) + _linear(DIT_DIM, DIT_DIM)
    time_projection = _linear(DIT_DIM, 6 * DIT_DIM)
    head = _linear(DIT_DIM, LATENT_CHANNELS * t * h * w) + 2 * DIT_DIM
    hidden = DIT_DIM  # MotionEncoder_tc(in_dim=1024, hidden_dim=5120, num_heads=4)
    audio_encoder = (
        3 * AUDIO_DIM * (hidden // 4 * AUDIO_TOKENS_PER_FRAME) + hidden  # conv1_local
        + 3 * AUDIO_DIM * (hidden // 4) + hidden // 4  # conv1_global
        + 3 * (hidden // 4) * (hidden // 2) + hidden // 2  # conv2
        + 3 * (hidden // 2) * hidden + hidden  # conv3
        + _linear(hidden, hidden) + hidden + 25  # final_linear, padding tokens, layer weights
    )
    framepack = sum(LATENT_CHANNELS * k * (2 * k) * (2 * k) * DIT_DIM + DIT_DIM
                    for k in (1, 2, 4))  # kernels (1,2,2), (2,4,4), (4,8,8)
    cond_mask = 3 * DIT_DIM
    return (patch_embedding + cond_encoder + text_embedding + time_embedding + time_projection
            + head + audio_encoder + framepack + cond_mask + _audio_injector_params())


def dit_params() -> int:
    """The whole DiT: ~16.3e9 (40 x 351M blocks + 2.24e9 outside them)."""
    return DIT_LAYERS * dit_block_params() + dit_root_params()


def _fp8_linear_weights() -> int:
    """Weights --fp8 converts: the blocks' and audio injector's Linear weights. Kept in bf16:
    biases, norms, convs and the ignore list (text/time embedding, time projection, head,
    audio encoder final linear)."""
    return DIT_LAYERS * _dit_block_linear_weights() + _audio_injector_linear_weights()


def dit_weights_gb(fp8: bool) -> float:
    """DiT weights on one GPU; fp8 stores converted weights in 1 byte (~0.51x of bf16)."""
    total = dit_params() * BF16_BYTES
    if fp8:
        total -= _fp8_linear_weights() * (BF16_BYTES - FP8_BYTES)
    return total / GIB


def fsdp_root_unit_gb(fp8: bool) -> float:
    """What the first FSDP forward unshards and holds: the root unit, in full."""
    total = dit_root_params() * BF16_BYTES
    if fp8:
        total -= _audio_injector_linear_weights() * (BF16_BYTES - FP8_BYTES)
    return total / GIB


def fsdp_block_unit_gb(fp8: bool) -> float:
    """One block's unit, unsharded while that block runs."""
    total = dit_block_params() * BF16_BYTES
    if fp8:
        total -= _dit_block_linear_weights() * (BF16_BYTES - FP8_BYTES)
    return total / GIB


def lora_adapters_gb() -> float:
    """PEFT LoRA adapters alive until merge_and_unload (fp32)."""
    square = LORA_RANK * 2 * DIT_DIM  # A: dim -> r, B: r -> dim
    ffn = 2 * LORA_RANK * (DIT_DIM + DIT_FFN)  # ffn.0 and ffn.2
    params = DIT_LAYERS * (8 * square + ffn) + AUDIO_INJECT_LAYERS * 4 * square
    return params * LORA_BYTES / GIB


def text_encoder_gb() -> float:
    """umt5-xxl encoder in bf16: ~5.68e9 params = 10.6 GiB (11.4 GB)."""
    layer = (4 * T5_DIM * T5_DIM + 3 * T5_DIM * T5_FFN + 2 * T5_DIM
             + T5_REL_BUCKETS * T5_HEADS)
    params = T5_VOCAB * T5_DIM + T5_LAYERS * layer + T5_DIM
    return params * BF16_BYTES / GIB


def audio_encoder_gb() -> float:
    """wav2vec2-large in bf16: ~0.32e9 params."""
    layer = (4 * _linear(W2V_DIM, W2V_DIM) + _linear(W2V_DIM, W2V_FFN)
             + _linear(W2V_FFN, W2V_DIM) + 4 * W2V_DIM)
    return (W2V_LAYERS * layer + W2V_FRONTEND_PARAMS) * BF16_BYTES / GIB


def vae_weights_gb() -> float:
    return VAE_PARAMS * BF16_BYTES / GIB


# --------------------------------------------------------------------------------------------
# Tokens and the size-dependent terms.
# --------------------------------------------------------------------------------------------
def latent_frames(infer_frames: int) -> int:
    """Latent frames of one clip: upstream's (infer_frames + 3 + 73)//4 - (73 + 3)//4."""
    return (infer_frames + 3 + MOTION_FRAMES) // VAE_STRIDE[0] - (MOTION_FRAMES + 3) // VAE_STRIDE[0]


def frame_tokens(width: int, height: int) -> int:
    """DiT tokens of one latent frame: pixels / VAE stride 8 / patch 2 per side."""
    lat_h, lat_w = height // VAE_STRIDE[1], width // VAE_STRIDE[2]
    return lat_h * lat_w // (PATCH[1] * PATCH[2])


def kv_tokens(infer_frames: int, width: int, height: int) -> int:
    """Tokens in one per-step KV cache: one clip (upstream's max_seq_len)."""
    return latent_frames(infer_frames) * frame_tokens(width, height)


def cond_tokens(width: int, height: int) -> int:
    """Reference frame + frame-packed motion context (upstream computes 2640 at 704*384)."""
    lat_h, lat_w = height // VAE_STRIDE[1], width // VAE_STRIDE[2]
    tokens = frame_tokens(width, height)  # the reference latent
    for frames, k in zip(FRAMEPACK_BUCKETS, (1, 2, 4), strict=True):
        tokens += (frames // k) * (lat_h // (2 * k)) * (lat_w // (2 * k))
    return tokens


def query_tokens(width: int, height: int) -> int:
    """Tokens one DiT forward processes: a block of 3 latent frames while denoising
    (_forward_inference), or the cond tokens in the prefill (_forward_sink), whichever is more."""
    return max(FRAMES_PER_BLOCK * frame_tokens(width, height), cond_tokens(width, height))


def kv_cache_gb(tokens: int, layers: int = DIT_LAYERS) -> float:
    """k and v of `tokens` for `layers` layers, bf16."""
    return layers * 2 * tokens * DIT_HEADS * DIT_HEAD_DIM * BF16_BYTES / GIB


def activations_gb(width: int, height: int, infer_frames: int) -> float:
    """Transient working set of one block forward (flash attention: linear in tokens)."""
    q = query_tokens(width, height)
    c = cond_tokens(width, height)
    kv = kv_tokens(infer_frames, width, height) + c
    return (q * ACT_BYTES_PER_TOKEN + kv * ACT_BYTES_PER_KV_TOKEN
            + c * ACT_BYTES_PER_COND_TOKEN) / GIB


def vae_workspace_gb(width: int, height: int) -> float:
    return width * height * VAE_WORKSPACE_BYTES_PER_PIXEL / GIB


def vae_decode_gb(width: int, height: int, infer_frames: int) -> float:
    """Decoding one clip: the VAE working set plus the decoded frames (motion context + clip,
    fp32) and the 73 frames re-encoded as the next motion context."""
    decoded = VAE_STRIDE[0] * (latent_frames(infer_frames)
                               + (MOTION_FRAMES + 3) // VAE_STRIDE[0]) - 3
    frames_bytes = (decoded + MOTION_FRAMES) * 3 * width * height * FP32_BYTES
    return vae_workspace_gb(width, height) + frames_bytes / GIB


def per_layer_estimate(preset: Preset, layers: int, *, width: int | None = None,
                       height: int | None = None, resident: int | None = None,
                       storage: str = "bf16", prefetch: int = 1) -> dict[str, float]:
    """What `layers` DiT blocks need in one denoising step on one GPU (GiB), for a benchmark on
    a few layers: weights, one per-step KV cache + cond cache, the text cross-attention
    cache, and one block's activations (transient, so not scaled by `layers`). No CUDA context:
    compare with torch.cuda.max_memory_allocated(). With `resident` (block swap over the
    slice): resident blocks plus the swap slots, in `storage`."""
    w, h = _frame_size(preset, width, height)
    multi = options_of(preset).gpus_per_run == GPUS_MULTI
    cond_slots = COND_CACHE_TOKENS_MULTI if multi else COND_CACHE_TOKENS_SINGLE
    on_gpu = layers if resident is None else resident + min(layers - resident, prefetch + 1)
    return {
        "weights": on_gpu * block_gb(storage),
        "kv_cache": kv_cache_gb(kv_tokens(preset.infer_frames, w, h) + cond_slots, layers),
        "cross_attn_cache": kv_cache_gb(TEXT_TOKENS, layers),
        "activations": activations_gb(w, h, preset.infer_frames),
    }


def _frame_size(preset: Preset, width: int | None, height: int | None) -> tuple[int, int]:
    key_w, key_h = parse_size(preset.size)
    w = key_w if width is None else width
    h = key_h if height is None else height
    if w < 64 or h < 64:
        raise ValueError(f"frame size {w}x{h} is too small")
    return w, h


# --------------------------------------------------------------------------------------------
# Levers: block swap, weight storage, KV placement, encoders (one GPU, resident worker).
# --------------------------------------------------------------------------------------------
def storage_of(opts: LiveAvatarOptions) -> str:
    """How the DiT's Linear weights are stored: "fp8-native" (upstream's --fp8, fp8 compute),
    else weight_storage ("bf16"; "int8"/"fp8": 1 byte with bf16 compute)."""
    return "fp8-native" if opts.fp8 else opts.weight_storage


def _block_linear_out_channels() -> int:
    return 8 * DIT_DIM + DIT_FFN + DIT_DIM  # 2 x (q, k, v, o), ffn.0, ffn.2


def block_gb(storage: str) -> float:
    """One DiT block's weights in `storage` (see storage_of)."""
    total = dit_block_params() * BF16_BYTES
    if storage != "bf16":
        total -= _dit_block_linear_weights() * (BF16_BYTES - FP8_BYTES)
    if storage in ("int8", "fp8"):
        total += _block_linear_out_channels() * SCALE_BYTES
    return total / GIB


def root_gb(storage: str) -> float:
    """The DiT outside its 40 blocks: always on the GPU (the audio injector is converted)."""
    total = dit_root_params() * BF16_BYTES
    if storage != "bf16":
        total -= _audio_injector_linear_weights() * (BF16_BYTES - FP8_BYTES)
    if storage in ("int8", "fp8"):
        total += AUDIO_INJECT_LAYERS * 6 * DIT_DIM * SCALE_BYTES
    return total / GIB


def swapped_blocks(opts: LiveAvatarOptions) -> int:
    return DIT_LAYERS - opts.resident_blocks


def swap_slots(opts: LiveAvatarOptions) -> int:
    """Swapped blocks on the GPU at once: the running one and the prefetched ones."""
    return min(swapped_blocks(opts), opts.prefetch_blocks + 1)


def loads_on_host(opts: LiveAvatarOptions) -> bool:
    """The resident worker builds the DiT in host memory, converts it, then places it, when
    blocks are swapped or the storage is quantised (never whole on the GPU)."""
    return opts.resident_blocks < DIT_LAYERS or opts.weight_storage != "bf16"


def dit_gpu_gb(opts: LiveAvatarOptions) -> float:
    """DiT weights on the GPU while denoising: root, resident blocks, swap slots."""
    storage = storage_of(opts)
    return root_gb(storage) + (opts.resident_blocks + swap_slots(opts)) * block_gb(storage)


def encoders_on_cpu(opts: LiveAvatarOptions) -> bool:
    return opts.encoders == "cpu"


@dataclass(frozen=True)
class StepCost:
    """Time of one denoising step (one DiT forward over a block of 3 latent frames) on one GPU.

    step_s = kv_s + max(compute_s, weights_s): block copies run on a side stream behind the
    compute; KV-cache copies (in before the forward, out after) are on the compute stream.
    """

    compute_s: float
    weights_gb: float  # swapped blocks copied in per step
    weights_s: float
    kv_gb: float  # KV cache in + out per step (host KV caches)
    kv_s: float
    step_s: float
    forwards_per_clip: int
    fps: float  # output frames per second of one worker
    pcie_gib_s: float
    tflops: float

    def line(self) -> str:
        hidden = "hidden behind compute" if self.weights_s <= self.compute_s else "NOT hidden"
        return (f"per step: compute {self.compute_s:.2f} s at {self.tflops:g} TFLOPS; "
                f"block swap {self.weights_gb:.1f} GB = {self.weights_s:.2f} s at "
                f"{self.pcie_gib_s:g} GB/s ({hidden}); KV copies {self.kv_gb:.1f} GB = "
                f"{self.kv_s:.2f} s; step {self.step_s:.2f} s x {self.forwards_per_clip} per "
                f"clip -> {self.fps:.2f} frames/s per GPU")


def step_cost(preset: Preset, *, width: int | None = None, height: int | None = None,
              pcie_gib_s: float = PCIE_GIB_PER_S, tflops: float = GPU_TFLOPS) -> StepCost:
    """Expected time per denoising step and frames/s of one single-GPU worker (see StepCost).

    FLOPs from the shapes: 2 x tokens x Linear weights, plus QK^T and AV over the KV cache,
    the cond cache and the text tokens (upper bounds). Model-independent overheads (VAE decode,
    encoders, Python) are left out: a lower bound on time, for ranking the levers.
    """
    opts = options_of(preset)
    w, h = _frame_size(preset, width, height)
    storage = storage_of(opts)
    q = FRAMES_PER_BLOCK * frame_tokens(w, h)
    attended = kv_tokens(preset.infer_frames, w, h) + cond_tokens(w, h) + TEXT_TOKENS
    linear = DIT_LAYERS * _dit_block_linear_weights() + _audio_injector_linear_weights()
    flops = 2 * q * linear + DIT_LAYERS * 4 * q * attended * DIT_DIM
    compute = flops / (tflops * 1e12)
    if storage in ("int8", "fp8"):
        compute += linear * DEQUANT_BYTES_PER_WEIGHT / (GPU_MEM_GIB_PER_S * GIB)
    weights_gb = swapped_blocks(opts) * block_gb(storage)
    kv_gb = 0.0
    if opts.offload_kv_cache:
        kv_gb = 2 * (kv_cache_gb(kv_tokens(preset.infer_frames, w, h))
                     + kv_cache_gb(COND_CACHE_TOKENS_SINGLE))
    weights_s, kv_s = weights_gb / pcie_gib_s, kv_gb / pcie_gib_s
    step = kv_s + max(compute, weights_s)
    forwards = latent_frames(preset.infer_frames) // FRAMES_PER_BLOCK * preset.sample_steps
    return StepCost(compute_s=compute, weights_gb=weights_gb, weights_s=weights_s, kv_gb=kv_gb,
                    kv_s=kv_s, step_s=step, forwards_per_clip=forwards,
                    fps=preset.infer_frames / (forwards * step), pcie_gib_s=pcie_gib_s,
                    tflops=tflops)


def lever_lines(preset: Preset) -> list[str]:
    """One line per lever: what it is set to and what it puts where."""
    opts = options_of(preset)
    storage = storage_of(opts)
    k, swapped = opts.resident_blocks, swapped_blocks(opts)
    out = [f"lever resident_blocks={k}: {k} of {DIT_LAYERS} blocks on the GPU "
           f"({k * block_gb(storage):.2f} GB)"
           + (f", {swapped} in pinned host memory ({swapped * block_gb(storage):.2f} GB), "
              f"{swap_slots(opts)} swap slot(s) on the GPU "
              f"({swap_slots(opts) * block_gb(storage):.2f} GB)" if swapped else ", no swap"),
           f"lever weight storage {storage}: {block_gb(storage):.3f} GB per block, DiT root "
           f"{root_gb(storage):.2f} GB"
           + (", bf16 compute dequantised per layer" if storage in ("int8", "fp8") else ""),
           "lever KV caches: " + ("pinned host memory, one step's cache on the GPU at a time"
                                  if opts.offload_kv_cache else "on the GPU (4 per-step caches)"),
           f"lever encoders: {opts.encoders}"
           + (" (T5 and wav2vec2 never on the GPU)" if encoders_on_cpu(opts) else "")]
    if loads_on_host(opts):
        out.append("load: the DiT is built in host memory, converted, then placed (never "
                   "whole on the GPU)")
    return out


# --------------------------------------------------------------------------------------------
# Usable memory and calibration.
# --------------------------------------------------------------------------------------------
def _calibrate() -> tuple[float, float]:
    """(allocator reserve, multi-GPU residue) from FIELD_CASES[0].

    usable = nominal * DRIVER_VISIBLE_FRACTION - ALLOCATOR_RESERVE_GB: the reserve is what the
    caching allocator loses to fragmentation (22.15 usable of 23.65 visible: 1.50 GiB).
    MULTI_GPU_RESIDUE_GB is what the after-load figure holds beyond what is derived above
    (context + DiT shard + T5 + VAE): NCCL communicator buffers and allocator cache kept from
    the prepare steps (wav2vec2, VAE encode of the motion frames) that nvidia-smi still counts.
    It is calibrated, not derived, and applied to every multi-GPU rank.
    """
    case = FIELD_CASES[0]
    reserve = case.gpu_mem_gb * DRIVER_VISIBLE_FRACTION - case.usable_gb
    derived = (CUDA_CONTEXT_GB + dit_weights_gb(case.fp8) / DIT_GPUS_MULTI
               + text_encoder_gb() + vae_weights_gb())
    return reserve, case.loaded_gb - derived


ALLOCATOR_RESERVE_GB, MULTI_GPU_RESIDUE_GB = _calibrate()


def usable_gb(total_gb: float) -> float:
    """What one process can allocate on a card of `total_gb` nominal GiB (24 -> 22.15)."""
    return max(0.0, total_gb * DRIVER_VISIBLE_FRACTION - ALLOCATOR_RESERVE_GB)


# --------------------------------------------------------------------------------------------
# The estimate.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """Per-GPU memory of one launch. `components` is the peak phase's breakdown (GiB)."""

    components: dict[str, float]
    per_gpu_peak_gb: float
    usable_gb: float
    fits: bool
    headroom_gb: float  # usable - peak: negative when it does not fit
    gpus: int
    notes: list[str]
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # in run order
    peak_phase: str = ""
    fails_at: str | None = None  # first phase over the usable memory
    size_supported: bool = True  # False: upstream's fixed cond cache is too small for the size
    levers: list[str] = field(default_factory=list)  # one GPU: what each lever puts where
    cost: StepCost | None = None  # one GPU: expected time per step and frames/s

    def phase_gb(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    def lines(self) -> list[str]:
        """A human-readable breakdown."""
        verdict = "fits" if self.fits else f"does NOT fit (fails at {self.fails_at})"
        out = [f"per GPU: peak {self.per_gpu_peak_gb:.2f} GB in '{self.peak_phase}' of "
               f"{self.usable_gb:.2f} GB usable, headroom {self.headroom_gb:+.2f} GB: {verdict} "
               f"({self.gpus} GPU{'s' if self.gpus > 1 else ''})"]
        out += [f"  {name:<18} {gb:7.2f} GB" for name, gb in self.components.items()]
        out.append("  phases: " + ", ".join(f"{p} {self.phase_gb(p):.2f}" for p in self.phases))
        out += [f"  {line}" for line in self.levers]
        if self.cost is not None:
            out.append(f"  {self.cost.line()}")
        out += [f"  note: {n}" for n in self.notes]
        return out


def _sharding(opts: LiveAvatarOptions, requested: Sharding) -> Literal["replica", "fsdp"]:
    if requested == "auto":
        return "fsdp" if "--dit_fsdp" in opts.extra_args else "replica"
    if requested not in ("replica", "fsdp"):
        raise ValueError(f"dit_sharding must be auto, replica or fsdp, got {requested!r}")
    return requested


def _clean(phase: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in phase.items() if v > 0}


def estimate(preset: Preset, *, gpus: int | None = None, gpu_mem_gb: float,
             width: int | None = None, height: int | None = None,
             dit_sharding: Sharding = "auto") -> Estimate:
    """Per-GPU peak memory of one LiveAvatar launch of `preset` on `gpus` cards of `gpu_mem_gb`.

    gpus: GPUs of one launch, 1 or 5 (default: options_of(preset).gpus_per_run). width/height:
    the real frame size (portrait.output_size); default the area key's own sides.
    dit_sharding (5 GPUs): "replica" as upstream runs it, "fsdp" as the field measurement
    describes it; "auto" is fsdp only when liveavatar.extra_args holds --dit_fsdp.
    """
    if preset.engine != "liveavatar":
        raise ValueError(f"the memory model covers the liveavatar engine, not {preset.engine!r}")
    opts = options_of(preset)
    n = opts.gpus_per_run if gpus is None else gpus
    if n not in (1, GPUS_MULTI):
        raise ValueError(f"LiveAvatar runs on 1 GPU or on {GPUS_MULTI} (4 DiT + 1 VAE), not {n}; "
                         f"with 2-4 GPUs run independent single-GPU launches")
    if gpu_mem_gb <= 0:
        raise ValueError(f"gpu_mem_gb must be positive, got {gpu_mem_gb}")
    w, h = _frame_size(preset, width, height)
    multi = n == GPUS_MULTI
    fp8, t5_cpu = opts.fp8, "--t5_cpu" in opts.extra_args or encoders_on_cpu(opts)
    notes: list[str] = []

    ctx = {"cuda_context": CUDA_CONTEXT_GB}
    vae = vae_weights_gb()
    t5 = 0.0 if t5_cpu else text_encoder_gb()
    kv_step = kv_cache_gb(kv_tokens(preset.infer_frames, w, h))
    xattn = kv_cache_gb(TEXT_TOKENS)
    act = activations_gb(w, h, preset.infer_frames)
    decode = vae_decode_gb(w, h, preset.infer_frames)
    cond_needed = cond_tokens(w, h)
    cond_slots = COND_CACHE_TOKENS_MULTI if multi else COND_CACHE_TOKENS_SINGLE
    cond = kv_cache_gb(cond_slots)

    phases: dict[str, dict[str, float]] = {}
    levers: list[str] = []
    cost: StepCost | None = None
    if not multi:
        dit = dit_gpu_gb(opts)
        w2v = 0.0 if encoders_on_cpu(opts) else audio_encoder_gb()
        levers, cost = lever_lines(preset), step_cost(preset, width=w, height=h)
        # One GPU always runs with --offload_model True: without it the VAE stays on the CPU
        # (init_on_cpu) and decoding fails after all the denoising (causal_s2v_pipeline.py:
        # 961-965, 1146-1153), so presets refuse `offload: false` there (presets._check_rules).
        offload = True
        # With --offload_kv_cache the four caches (each with its own cond cache) live on the CPU
        # and one is copied onto the GPU for its step; otherwise 4 caches + one shared cond cache.
        kv = kv_step + cond if opts.offload_kv_cache else KV_STEPS * kv_step + cond
        kv_idle = 0.0 if opts.offload_kv_cache else kv  # between steps
        stay = {} if offload else {"text_encoder": t5, "vae_weights": vae}
        if loads_on_host(opts):  # built, merged and converted in host memory, then placed
            phases["load"] = {**ctx, "vae_weights": vae}
        else:
            phases["load"] = {**ctx, "dit_weights": dit_weights_gb(False),
                              "lora_adapters": lora_adapters_gb(), "vae_weights": vae}
        phases["encode_media"] = {**ctx, "dit_weights": dit, "vae_weights": vae,
                                  "audio_encoder": w2v,
                                  "vae_encode": vae_workspace_gb(w, h)}
        phases["loaded"] = {**ctx, "dit_weights": dit, "vae_weights": vae, "text_encoder": t5}
        phases["denoise"] = {**ctx, "dit_weights": dit, **stay, "kv_cache": kv,
                             "cross_attn_cache": xattn, "activations": act}
        if preset.online_decode:  # clip 0 inline: the DiT goes to the CPU, the caches stay
            phases["decode_inline"] = {**ctx, **({} if offload else {"dit_weights": dit}),
                                       "text_encoder": 0.0 if offload else t5,
                                       "vae_weights": vae, "kv_cache": kv_idle,
                                       "cross_attn_cache": xattn, "vae_decode": decode}
        # Deferred decode: with offload the per-step caches are dropped (the shared cond cache
        # is not) and the DiT stays on the GPU (its .cpu() is commented out upstream).
        left = (0.0 if opts.offload_kv_cache else cond) if offload else kv_idle
        phases["decode"] = {**ctx, "dit_weights": dit, "text_encoder": 0.0 if offload else t5,
                            "vae_weights": vae, "kv_cache": left, "cross_attn_cache": xattn,
                            "vae_decode": decode}
        if offload:
            notes.append("offload: T5, VAE and wav2vec2 stay on the CPU while the DiT denoises")
        if opts.offload_kv_cache:
            notes.append("offload_kv_cache: the 4 per-step KV caches live on the CPU; one "
                         f"({kv_step + cond:.1f} GB with its cond cache) is copied in per step")
        else:
            notes.append(f"KV caches: {KV_STEPS} per-step caches of {kv_step:.2f} GB + a "
                         f"{cond:.2f} GB cond cache stay on the GPU (allocated for 4 steps "
                         f"whatever sample_steps)")
    else:
        if loads_on_host(opts) or encoders_on_cpu(opts) or opts.weight_storage != "bf16":
            notes.append("the resident-worker levers (resident_blocks, weight_storage, "
                         "encoders) act on one GPU only: ignored with 5 GPUs")
        mode = _sharding(opts, dit_sharding)
        res = {"multi_gpu_residue": MULTI_GPU_RESIDUE_GB}
        dit_full = dit_weights_gb(fp8)
        kv = kv_step + cond  # one step per DiT rank, its own cond cache
        if preset.offload:
            notes.append("offload is ignored with 5 GPUs (the engine passes --offload_model False)")
        if opts.offload_kv_cache:
            notes.append("offload_kv_cache only acts with --single_gpu upstream: ignored")
        if mode == "replica":
            dit = dit_full
            phases["load"] = {**ctx, **res, "dit_weights": dit_weights_gb(False),
                              "lora_adapters": lora_adapters_gb(), "vae_weights": vae}
            notes.append("5 GPUs: upstream's TPP pipeline (no --dit_fsdp) keeps a full DiT "
                         "replica on every rank and runs one denoising step per DiT rank")
        else:
            dit = dit_full / DIT_GPUS_MULTI
            phases["load"] = {**ctx, **res, "dit_weights": dit, "vae_weights": vae}
            notes.append(f"FSDP: DiT sharded over the {DIT_GPUS_MULTI} DiT GPUs; each forward "
                         f"unshards the root unit ({fsdp_root_unit_gb(fp8):.2f} GB) and one "
                         f"block at a time")
        phases["encode_media"] = {**ctx, **res, "dit_weights": dit, "vae_weights": vae,
                                  "audio_encoder": audio_encoder_gb(),
                                  "vae_encode": vae_workspace_gb(w, h)}
        loaded = {**ctx, **res, "dit_weights": dit, "text_encoder": t5, "vae_weights": vae}
        phases["loaded"] = loaded
        gather: dict[str, float] = {}
        if mode == "fsdp":
            gather = {"regather": fsdp_root_unit_gb(fp8)}
            phases["regather"] = {**loaded, **gather}
            gather["regather_block"] = fsdp_block_unit_gb(fp8)
        phases["denoise"] = {**loaded, **gather, "kv_cache": kv, "cross_attn_cache": xattn,
                             "activations": act}
        vae_rank_dit = {"dit_weights": dit} if mode == "replica" else {}
        phases["vae_rank"] = {**ctx, **res, **vae_rank_dit, "text_encoder": t5,
                              "vae_weights": vae, "vae_decode": decode}

    if fp8:
        notes.append("fp8 needs compute capability 8.9+ (Ada/Hopper): torch._scaled_mm")
        if multi or not loads_on_host(opts):
            notes.append(f"fp8: the DiT is loaded in bf16 ({dit_weights_gb(False):.1f} GB) on "
                         f"the GPU first, then converted ({dit_weights_gb(True):.1f} GB)")
    if t5_cpu:
        notes.append("--t5_cpu: the text encoder never goes to the GPU")
    size_supported = cond_needed <= cond_slots
    if not size_supported:
        notes.append(f"warning: {w}x{h} needs {cond_needed} cond tokens but upstream's cond "
                     f"cache holds {cond_slots}: expect a shape error, whatever the memory")

    phases = {name: _clean(p) for name, p in phases.items()}
    totals = {name: sum(p.values()) for name, p in phases.items()}
    peak_phase = max(totals, key=lambda k: totals[k])
    peak = totals[peak_phase]
    usable = usable_gb(gpu_mem_gb)
    fails_at = next((name for name, gb in totals.items() if gb > usable), None)
    notes.insert(0, f"{w}x{h}, {preset.infer_frames} frames/clip: {kv_tokens(preset.infer_frames, w, h)} "
                    f"tokens per KV cache, {query_tokens(w, h)} per DiT forward")
    return Estimate(components=dict(phases[peak_phase]), per_gpu_peak_gb=peak, usable_gb=usable,
                    fits=fails_at is None, headroom_gb=usable - peak, gpus=n, notes=notes,
                    phases=phases, peak_phase=peak_phase, fails_at=fails_at,
                    size_supported=size_supported, levers=levers, cost=cost)


# --------------------------------------------------------------------------------------------
# Host memory (RAM) of one launch.
# --------------------------------------------------------------------------------------------
# A torch + CUDA process before any model: CUDA/cuBLAS/cuDNN/NCCL libraries and the host side
# of the CUDA context. Assumption (a torch 2.x CUDA 12 process holds 2.5-3.5 GiB RSS), not
# measured on this project's machines.
PROCESS_HOST_GB = 3.0
# Decoded video held in host memory until it is saved: every clip's frames are appended to a
# list on the CPU in bf16, concatenated (pipeline generate(): `out.append(image.cpu())`,
# `torch.cat(out)`), then save_video clamps, grids and scales copies of it before the uint8
# conversion (wan_2_2/utils/utils.py:104-111). Bytes per decoded value alive at the peak:
# the bf16 video, its clamped copy, the stacked grid and the scaled copy (4 x 2).
DECODED_BYTES_PER_VALUE = 8


@dataclass(frozen=True)
class HostEstimate:
    """Host RAM of one launch (GiB): the peak's components and whether it fits `total_gb`."""

    components: dict[str, float]
    peak_gb: float
    total_gb: float | None  # the machine's RAM; None: unknown (no verdict)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total_gb is None or self.peak_gb <= self.total_gb

    def lines(self) -> list[str]:
        verdict = ("no verdict (host RAM unknown)" if self.total_gb is None else
                   f"of {self.total_gb:.1f} GB: " + ("fits" if self.fits else "does NOT fit"))
        out = [f"host RAM: peak {self.peak_gb:.2f} GB {verdict}"]
        out += [f"  {name:<18} {gb:7.2f} GB" for name, gb in self.components.items()]
        out += [f"  note: {n}" for n in self.notes]
        return out


def host_estimate(preset: Preset, *, total_gb: float | None, width: int | None = None,
                  height: int | None = None, frames: int | None = None) -> HostEstimate:
    """Peak host RAM of one LiveAvatar launch of `preset` (per process; 5-GPU launches run 5).

    frames: decoded frames of the launch (default: a full batch, clips_per_batch clips).
    """
    w, h = _frame_size(preset, width, height)
    opts = options_of(preset)
    multi = opts.gpus_per_run == GPUS_MULTI
    n = frames if frames is not None else preset.clips_per_batch * preset.infer_frames
    comps: dict[str, float] = {"process": PROCESS_HOST_GB}
    notes: list[str] = []
    if not multi:  # with --offload_model the encoders wait on the CPU while the DiT works
        comps["text_encoder"] = text_encoder_gb()
        comps["audio_encoder"] = audio_encoder_gb()
        comps["vae_weights"] = vae_weights_gb()
    elif "--t5_cpu" in opts.extra_args:
        comps["text_encoder"] = text_encoder_gb()  # each rank keeps its T5 on the CPU
    if opts.offload_kv_cache and not multi:
        # _initialize_kv_cache: each of the 4 per-step caches gets its own cond cache on the
        # CPU (causal_s2v_pipeline.py:606-622), copied to the GPU and back every step.
        per = kv_cache_gb(kv_tokens(preset.infer_frames, w, h)) + kv_cache_gb(
            COND_CACHE_TOKENS_SINGLE)
        comps["kv_cache"] = KV_STEPS * per
        notes.append(f"offload_kv_cache: {KV_STEPS} caches of {per:.1f} GB in host "
                     f"memory; each step copies one to the GPU and back ({2 * per:.1f} GB per "
                     f"step, {2 * per * preset.sample_steps:.0f} GB per block of 3 latent "
                     f"frames): expect denoising several times slower")
    if not multi and swapped_blocks(opts):
        storage = storage_of(opts)
        comps["dit_swapped_blocks"] = swapped_blocks(opts) * block_gb(storage)
        notes.append(f"block swap: {swapped_blocks(opts)} DiT blocks in pinned host memory "
                     f"({block_gb(storage):.2f} GB each)")
    if not multi and opts.offload_kv_cache:
        notes.append("resident worker: the KV caches are in PINNED host memory (page-locked: "
                     "it cannot be swapped out)")
    comps["decoded_frames"] = n * 3 * w * h * DECODED_BYTES_PER_VALUE / GIB
    comps = _clean(comps)
    peak = sum(comps.values())
    if not multi and loads_on_host(opts):
        # Loading: the bf16 DiT and its fp32 LoRA adapters in host memory beside the encoders,
        # converted and placed block by block before any cache or frame exists.
        load = _clean({"process": PROCESS_HOST_GB, "dit_load_bf16": dit_weights_gb(False),
                       "lora_adapters": lora_adapters_gb(),
                       "text_encoder": text_encoder_gb(), "audio_encoder": audio_encoder_gb(),
                       "vae_weights": vae_weights_gb()})
        load_gb = sum(load.values())
        notes.append(f"load: the DiT is built in host memory ({load_gb:.1f} GB with the "
                     f"encoders), converted, then placed; rendering holds {peak:.1f} GB")
        if load_gb > peak:
            comps, peak = load, load_gb
    return HostEstimate(components=comps, peak_gb=peak, total_gb=total_gb, notes=notes)


def rung_effects(preset: Preset) -> list[tuple[int, float, float]]:
    """(rung, peak GiB before it, peak GiB with it) for each out-of-memory retry rung: the
    peak after loading (see _retry_peak).

    A rung whose peak is not lower cannot help a CUDA out-of-memory failure and costs a full
    model reload (e.g. offload_kv_cache on 5 GPUs, which the TPP pipeline ignores).
    """
    if preset.engine != "liveavatar" or not preset.oom_retry:
        return []
    data = {**preset.to_dict(), "oom_retry": []}
    out = []
    before = _retry_peak(estimate(preset, gpu_mem_gb=80))
    for k in range(1, len(preset.oom_retry) + 1):
        rung = presets.build(presets.rung_values(data, preset.oom_retry, k), f"oom_retry rung {k}")
        after = _retry_peak(estimate(rung, gpu_mem_gb=80))
        out.append((k, before, after))
        before = after
    return out


def _retry_peak(est: Estimate) -> float:
    """The peak over the phases a retry can change: all but 'load', where the bf16 weights
    alone decide (an out-of-memory failure there is not cured by lighter settings)."""
    return max(sum(p.values()) for name, p in est.phases.items() if name != "load")


def rung_warnings(preset: Preset) -> list[str]:
    """A warning for each retry rung that does not lower the estimated per-GPU peak."""
    return [f"oom_retry rung {k} ({preset.oom_retry[k - 1]}) does not lower the estimated "
            f"peak after loading ({before:.2f} -> {after:.2f} GB per GPU): it cannot help an out-of-memory "
            f"failure and costs a model reload"
            for k, before, after in rung_effects(preset) if after >= before - 0.005]


# --------------------------------------------------------------------------------------------
# --fit: the fastest combination of levers that fits the card and the host RAM.
# --------------------------------------------------------------------------------------------
# Headroom the fit keeps on the card beyond the estimate: the estimate's own error (the GPU
# benchmark's target is 15%; this margin is an assumption until it has run).
FIT_MARGIN_GB = 1.0
# Preference among equally fast storages: exact first, then 1-byte kinds; int8 before fp8
# storage because per-channel int8 has a uniform step of max/127 where e4m3 keeps 3 mantissa
# bits (up to 6% of a weight) - both computed in bf16.
_STORAGE_RANK = {"bf16": 0, "fp8-native": 1, "int8": 2, "fp8": 3}


@dataclass(frozen=True)
class LeverFit:
    """What --fit chose: the preset with the levers, one worker's estimates, how many workers."""

    preset: Preset
    estimate: Estimate
    host: HostEstimate  # one worker (total_gb: the host RAM share of one worker, or None)
    cost: StepCost
    workers: int  # single-GPU workers at once, one per card
    gpus: int
    host_mem_gb: float | None
    settings: dict[str, Any]  # liveavatar.<key>: value (the --set lines)

    @property
    def fps(self) -> float:
        return self.workers * self.cost.fps

    def set_lines(self) -> list[str]:
        def show(v: Any) -> str:
            return str(v).lower() if isinstance(v, bool) else str(v)
        return [f"--set {k}={show(v)}" for k, v in self.settings.items()]


def fit_levers(preset: Preset, *, gpus: int = 1, gpu_mem_gb: float,
               host_mem_gb: float | None = None, width: int | None = None,
               height: int | None = None, pcie_gib_s: float = PCIE_GIB_PER_S,
               tflops: float = GPU_TFLOPS) -> LeverFit | None:
    """The fastest lever combination for `preset`'s size, frames and steps: one single-GPU
    worker per card (`gpus` cards of `gpu_mem_gb`), as many workers as the host RAM holds.

    Tries resident_blocks 40..0, weight storage (bf16, int8; fp8 storage when the preset asks
    for it; upstream's fp8 compute when the preset has fp8: true), KV caches on the GPU or in
    pinned host memory, encoders on the GPU or the CPU. Each must fit the card with
    FIT_MARGIN_GB to spare and the host RAM (workers x the host peak of one). Fastest = most
    frames/s over all workers (StepCost); ties go to exact storage, encoders and KV caches on
    the GPU, more resident blocks, less host RAM. None when nothing fits.
    """
    if preset.engine != "liveavatar":
        raise ValueError(f"--fit covers the liveavatar engine, not {preset.engine!r}")
    opts = options_of(preset)
    if opts.fp8:
        storages = [("bf16", True)]
    elif opts.weight_storage == "fp8":
        storages = [("bf16", False), ("fp8", False)]
    else:
        storages = [("bf16", False), ("int8", False)]
    best: tuple[tuple[Any, ...], LeverFit] | None = None
    for storage, fp8 in storages:
        for kv_host in (False, True):
            for enc in ("gpu", "cpu"):
                for k in range(DIT_LAYERS, -1, -1):
                    cand_opts = dataclasses.replace(
                        opts, gpus_per_run=1, fp8=fp8, weight_storage=storage,
                        offload_kv_cache=kv_host, encoders=enc, resident_blocks=k)
                    cand = with_options(preset, cand_opts, offload=True)
                    est = estimate(cand, gpus=1, gpu_mem_gb=gpu_mem_gb, width=width,
                                   height=height)
                    if not (est.fits and est.size_supported and est.headroom_gb >= FIT_MARGIN_GB):
                        continue
                    host = host_estimate(cand, total_gb=None, width=width, height=height)
                    workers = gpus if host_mem_gb is None else min(
                        gpus, int(host_mem_gb // host.peak_gb))
                    if workers < 1:
                        continue
                    cost = step_cost(cand, width=width, height=height, pcie_gib_s=pcie_gib_s,
                                     tflops=tflops)
                    key = (-round(workers * cost.fps, 3), _STORAGE_RANK[storage_of(cand_opts)],
                           enc != "gpu", kv_host, -k, host.peak_gb)
                    if best is not None and key >= best[0]:
                        break  # fewer resident blocks only get slower or equal from here
                    settings = {"liveavatar.gpus_per_run": 1, "offload": True,
                                "liveavatar.resident_blocks": k,
                                "liveavatar.weight_storage": storage, "liveavatar.fp8": fp8,
                                "liveavatar.offload_kv_cache": kv_host,
                                "liveavatar.encoders": enc}
                    share = None if host_mem_gb is None else host_mem_gb / workers
                    best = (key, LeverFit(
                        preset=cand, estimate=est,
                        host=dataclasses.replace(host, total_gb=share), cost=cost,
                        workers=workers, gpus=gpus, host_mem_gb=host_mem_gb, settings=settings))
    return None if best is None else best[1]


# --------------------------------------------------------------------------------------------
# Calibration report and preset choice.
# --------------------------------------------------------------------------------------------
def calibration_report() -> list[str]:
    """Estimate vs measurement for every field case."""
    out: list[str] = []
    for case in FIELD_CASES:
        est = estimate(case.preset(), gpus=case.gpus, gpu_mem_gb=case.gpu_mem_gb,
                       dit_sharding=case.dit_sharding)
        loaded = est.phase_gb("loaded")
        regather = est.phases.get("regather", {}).get("regather", 0.0)
        rows = [("after load", loaded, case.loaded_gb),
                ("re-gather", regather, case.regather_gb),
                ("needed", loaded + regather, case.needed_gb),
                ("usable", est.usable_gb, case.usable_gb)]
        out.append(f"{case.name} [{case.size}, {case.gpus}x{case.gpu_mem_gb:g} GB, "
                   f"{case.dit_sharding}]")
        out += [f"  {label:<11} estimate {e:6.2f} GB  measured {m:6.2f} GB  ({e - m:+.2f})"
                for label, e, m in rows]
        out.append(f"  fits       estimate {est.fits}  measured {case.fits}"
                   f"  (full peak {est.per_gpu_peak_gb:.2f} GB in '{est.peak_phase}')")
    return out


def _quality(preset: Preset) -> tuple[int, int, int, int, int]:
    w, h = parse_size(preset.size)
    return (w * h, preset.sample_steps, preset.infer_frames, int(not preset.offload),
            int(not options_of(preset).fp8))


def best_fit(presets: dict[str, Preset], gpus: int,
             gpu_mem_gb: float) -> tuple[str, Estimate] | None:
    """The best-quality LiveAvatar preset that fits `gpus` cards of `gpu_mem_gb`, or None.

    Ranking: larger area, then more sample_steps, then more infer_frames, then no offload,
    then no fp8; ties go to the name that sorts first. A preset needs gpus_per_run <= gpus.
    """
    ranked = sorted(((name, p) for name, p in presets.items()
                     if p.engine == "liveavatar" and options_of(p).gpus_per_run <= gpus),
                    key=lambda item: (tuple(-v for v in _quality(item[1])), item[0]))
    for name, preset in ranked:
        est = estimate(preset, gpu_mem_gb=gpu_mem_gb)
        if est.fits and est.size_supported:
            return name, est
    return None
