"""The liveavatar section of a preset, and the upstream facts presets are checked against
(see liveavatar-contract.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from avatarcli.options import Preset, knob

# Area keys upstream knows (wan/configs/__init__.py SIZE_CONFIGS / MAX_AREA_CONFIGS).
SIZES = ("720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704",
         "1024*704", "704*1024", "720*400", "704*384", "688*368", "384*256")
# KV caches exist for 4 denoising steps only.
MAX_STEPS = 4


@dataclass(frozen=True)
class LiveAvatarOptions:
    """Where LiveAvatar lives and how it is launched (used by the liveavatar engine)."""

    # LiveAvatar repository root (the launch's working directory).
    repo: str = knob("", help="LiveAvatar checkout")
    # torchrun of LiveAvatar's own environment (not avatarcli's).
    torchrun: str = knob("torchrun", help="torchrun of LiveAvatar's environment")
    # Wan2.2-S2V-14B checkpoint directory, relative to repo unless absolute.
    ckpt_dir: str = knob("ckpt/Wan2.2-S2V-14B/", help="checkpoint directory")
    # LoRA weights as a LOCAL path, so nothing is fetched from a model hub at run time.
    lora_path: str = knob("", help="local LoRA path")
    # Text prompt; empty means a .txt next to the portrait, else a neutral prompt.
    prompt: str = knob("", help="text prompt")
    # GPUs per launch: 1 (single GPU, offload) or 5 (4 for the DiT + 1 for the VAE).
    gpus_per_run: int = knob(1, choices=(1, 5), help="GPUs per launch")
    # FP8 weights via torch._scaled_mm (compute capability 8.9+).
    fp8: bool = knob(False, help="--fp8")
    # Keep the four per-step KV caches in host memory: fits smaller GPUs, costs host RAM
    # (about 47 GiB at 704*384) and a copy of each cache to the GPU and back at every step
    # (the resident worker keeps them in PINNED host memory and copies without blocking).
    offload_kv_cache: bool = knob(False, help="--offload_kv_cache")
    # Memory levers of the RESIDENT worker (one GPU; the resident LiveAvatar worker applies them
    # with avatarcli/engines/liveavatar/levers.py; a one-process-per-batch script launch ignores
    # them). `avatar plan --fit` picks them for a card; `avatar plan` shows what each costs.
    # DiT blocks (of 40) kept on the GPU; the others stay in pinned host memory and are copied
    # in one block ahead of their use on a side CUDA stream (block swap). 40: no swap.
    resident_blocks: int = knob(40, bounds=(0, 40),
                                help="DiT blocks on the GPU, rest streamed (resident worker)")
    # Swapped blocks copied ahead of their use (each costs one block of GPU memory).
    prefetch_blocks: int = knob(1, bounds=(0, 4), help="blocks prefetched (resident worker)")
    # Storage of the DiT's Linear weights, computed in bf16 dequantised per layer (any GPU):
    # int8 or fp8 (e4m3) with one scale per output channel, half the bytes and half the swap
    # transfer. `fp8: true` is upstream's own fp8 compute instead (compute capability 8.9+).
    weight_storage: str = knob("bf16", choices=("bf16", "int8", "fp8"),
                               help="DiT weight storage, bf16 compute (resident worker)")
    # Text (T5, 10.6 GiB) and audio (wav2vec2) encoders: on the GPU when they run, or always on
    # the CPU (slower prompt/audio encoding once per batch; frees the GPU).
    encoders: str = knob("gpu", choices=("gpu", "cpu"), help="where T5/wav2vec2 run (resident worker)")
    # Frames the model's video leads the audio it was given: upstream denoises clip r against
    # audio frames r*F.. and drops clip 0's first 3 decoded frames, so output frame n shows
    # audio frame n+3 (causal_s2v_pipeline.py:1000-1005, 1119, 1170). Each batch's audio slice
    # starts this many frames earlier, so the lips match the muxed sound. Read from the code,
    # not yet measured on a GPU: a measurement (`avatar check`) may correct it here.
    audio_shift_frames: int = knob(3, bounds=(-24, 24), help="model's video lead over its audio")
    sample_solver: str = knob("euler", choices=("euler",), help="--sample_solver")
    training_config: str = knob("liveavatar/configs/s2v_causal_sft.yaml", help="--training_config")
    # Extra environment for the launch (e.g. ENABLE_COMPILE: "false").
    env: dict[str, str] = knob({}, help="extra environment")
    # Extra raw flags appended to the upstream command line.
    extra_args: list[str] = knob([], help="extra upstream flags")


def options_of(preset: Preset) -> LiveAvatarOptions:
    """The preset's liveavatar section, typed."""
    return preset.section(LiveAvatarOptions)


def with_options(preset: Preset, opts: LiveAvatarOptions, **changes: object) -> Preset:
    """`preset` with its liveavatar section replaced (and other keys changed)."""
    return dataclasses.replace(preset, sections={**preset.sections, "liveavatar": opts},
                               **changes)  # type: ignore[arg-type]
