"""The settings a preset holds: one frozen dataclass per section, defaults and bounds in one place.

A field's metadata says what values are valid; `presets.py` validates against it, so adding a
knob here is all it takes to make it loadable, overridable with `--set` and shown by
`avatar presets show`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def knob(default: Any, *, bounds: tuple[float, float] | None = None,
         choices: tuple[Any, ...] | None = None, help: str = "") -> Any:
    """A dataclass field with its valid range or choices attached."""
    meta = {"bounds": bounds, "choices": choices, "help": help}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


ENGINES = ("builtin", "liveavatar", "command")
# Engines that start every batch afresh from the portrait (a model's state does not carry over
# from one launch to the next): their seams need an overlap, and `gen` checks their output.
RESTARTING_ENGINES = ("liveavatar", "command")
SEAM_OVERLAP_AUTO = 8  # frames (0.32 s at 25 fps): boundaries sit in pauses, so this is short


@dataclass(frozen=True)
class BuiltinOptions:
    """Knobs of the built-in CPU animator."""

    # Scales the mouth opening; 0 keeps the mouth closed.
    mouth_gain: float = knob(1.0, bounds=(0.0, 3.0), help="mouth opening scale")
    # Average blinks per minute; 0 disables blinking.
    blink_rate_per_min: float = knob(15.0, bounds=(0.0, 60.0), help="blinks per minute")
    # Head motion amplitude: 1 is subtle, 0 is still.
    head_motion: float = knob(1.0, bounds=(0.0, 3.0), help="head motion scale")
    # Show a hint of upper teeth when the mouth is wide open.
    teeth: bool = knob(True, help="draw upper teeth when wide open")
    # x264 speed/size trade-off for parts; all parts of a job must share it (they are joined by copy).
    x264_preset: str = knob("veryfast", choices=("ultrafast", "superfast", "veryfast", "faster",
                                                  "fast", "medium", "slow"), help="x264 preset")
    # x264 constant rate factor: lower is better quality and bigger files.
    crf: int = knob(20, bounds=(0, 51), help="x264 CRF")


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
    # with avatarcli/engines/liveavatar_levers.py; a one-process-per-batch script launch ignores
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


@dataclass(frozen=True)
class CommandOptions:
    """Any other model through a command template (used by the command engine)."""

    # Argument list with placeholders such as {audio}, {image}, {out}.
    template: list[str] = knob([], help="command template")
    # Working directory of the command.
    cwd: str = knob("", help="working directory")
    # Extra environment for the command.
    env: dict[str, str] = knob({}, help="extra environment")
    # Glob inside {outdir} that finds the produced video when the model picks its own name.
    output: str = knob("", help="output glob inside {outdir}")
    # Text for the {prompt} placeholder.
    prompt: str = knob("", help="text prompt")


@dataclass(frozen=True)
class WorkerOptions:
    """Resident model workers: one process loads the model once and renders batch after batch
    (engines that opt in: LiveAvatar on one GPU). It is replaced before its memory builds up."""

    # Batches one worker renders before it is replaced; 1 = a fresh process per batch.
    max_batches: int = knob(20, bounds=(1, 10000), help="batches per worker")
    # Replace the worker when its host RSS after a batch exceeds its RSS after the first by this.
    rss_growth_mb: float = knob(4096.0, bounds=(1.0, 1e7), help="host RSS growth bound (MiB)")
    # Replace it when its reserved GPU memory grows past this over its level after the first batch.
    gpu_growth_gb: float = knob(2.0, bounds=(0.01, 1e4), help="reserved GPU growth bound (GiB)")
    # Stop a worker that waited this long for its next batch (between rows of `avatar batch`).
    idle_s: float = knob(300.0, bounds=(0.0, 86400.0), help="idle seconds before it stops")


@dataclass(frozen=True)
class Preset:
    """A fully resolved preset. Field defaults are the values no preset overrides."""

    # Which engine renders the parts.
    engine: str = knob("builtin", choices=ENGINES, help="rendering engine")
    # One line shown by `avatar presets`.
    description: str = knob("", help="one-line description")
    # Output AREA key "W*H": real width/height follow the portrait's aspect ratio within it.
    size: str = knob("512*512", help="area key W*H")
    # Output frame rate (LiveAvatar renders at 25).
    fps: int = knob(25, bounds=(1, 120), help="frames per second")
    # Frames per clip: the model's unit of generation.
    infer_frames: int = knob(48, bounds=(4, 240), help="frames per clip")
    # Diffusion sampling steps (model engines).
    sample_steps: int = knob(4, bounds=(1, 100), help="sampling steps")
    # Swap whole models between GPU and CPU (model engines).
    offload: bool = knob(False, help="offload models to CPU")
    # Decode latents while generating instead of at the end (model engines).
    online_decode: bool = knob(False, help="online VAE decode")
    # Clips per batch; each batch is one fresh process, which bounds memory.
    clips_per_batch: int = knob(25, bounds=(1, 10000), help="clips per batch process")
    # Pause between batches, e.g. to let a GPU cool or free memory.
    cooldown_s: float = knob(0.0, bounds=(0.0, 3600.0), help="seconds between batches")
    # Seconds one batch process may run before its process group is killed and the batch is
    # retried once (then the job fails, exit 3, resumable). 0: derived from the engine's
    # expected time per frame (runner.batch_timeout_s), so a hung model never blocks a cron job.
    batch_timeout_s: float = knob(0.0, bounds=(0.0, 7 * 86400.0), help="per-batch time limit")
    # Seed for everything random in the engine.
    seed: int = knob(420, bounds=(0, 2**31 - 1), help="random seed")
    # Lighter settings to retry a batch with after a CUDA out-of-memory failure, one rung at
    # a time, each adding to the ones before: e.g. [{liveavatar.offload_kv_cache: true},
    # {infer_frames: 24}]. Only the failing batch is retried.
    oom_retry: list[dict[str, Any]] = knob([], help="out-of-memory retry ladder")
    # Frames each batch after the first also renders before its boundary; assembly crossfades
    # them with the end of the previous part, so an engine that restarts at every batch does
    # not jump there. -1: auto (SEAM_OVERLAP_AUTO for engines that restart, 0 for builtin).
    seam_overlap: int = knob(-1, bounds=(-1, 240), help="frames crossfaded at each seam, -1 auto")
    # Run `avatar check` on each finished video of a model engine and keep its figures.
    check: bool = knob(True, help="check finished videos of model engines")
    builtin: BuiltinOptions = field(default_factory=BuiltinOptions)
    liveavatar: LiveAvatarOptions = field(default_factory=LiveAvatarOptions)
    command: CommandOptions = field(default_factory=CommandOptions)
    worker: WorkerOptions = field(default_factory=WorkerOptions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def overlap_frames(self) -> int:
        """`seam_overlap` with auto resolved for the engine."""
        if self.seam_overlap >= 0:
            return self.seam_overlap
        return SEAM_OVERLAP_AUTO if self.engine in RESTARTING_ENGINES else 0


SECTIONS: dict[str, type] = {
    "builtin": BuiltinOptions,
    "liveavatar": LiveAvatarOptions,
    "command": CommandOptions,
    "worker": WorkerOptions,
}

# Keys whose change does not change a single rendered pixel: a job survives them.
NON_RENDERING_KEYS = frozenset({"description", "cooldown_s", "batch_timeout_s", "worker",
                                "check"})
# Keys a retry rung may change: per-launch settings, never the plan or the output's identity.
RUNG_FORBIDDEN_KEYS = frozenset({"engine", "fps", "seed", "clips_per_batch", "oom_retry",
                                 "description", "cooldown_s", "seam_overlap", "check"})

# Upstream LiveAvatar facts the presets are checked against (see liveavatar-contract.md).
LIVEAVATAR_SIZES = ("720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704",
                    "1024*704", "704*1024", "720*400", "704*384", "688*368", "384*256")
# KV caches exist for 4 denoising steps only.
LIVEAVATAR_MAX_STEPS = 4
