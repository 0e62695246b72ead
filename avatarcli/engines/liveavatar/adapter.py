"""A resident LiveAvatar worker: load upstream's pipeline once, render batch after batch.

Runs under LiveAvatar's OWN Python environment (torch 2.8 + flash-attn), started by path from
the checkout root, under that environment's torchrun:

    cd LIVEAVATAR && torchrun --nproc_per_node=1 --master_port=P /path/to/liveavatar_adapter.py \
        --ckpt_dir ckpt/Wan2.2-S2V-14B/ --training_config liveavatar/configs/s2v_causal_sft.yaml \
        --lora_path /path/liveavatar.safetensors [--fp8] [--offload_kv_cache] [--t5_cpu] \
        --ffmpeg /path/to/ffmpeg

avatarcli is NOT installed there: this file needs only upstream's code, torch, numpy and the
standard library. It builds `WanS2V` (liveavatar/models/wan/causal_s2v_pipeline.py) with the
settings upstream's script applies (minimal_inference/s2v_streaming_interact.py:455-498: the
single-GPU constructor keywords, the LoRA from the training config, fp8 conversion; compile
follows ENABLE_COMPILE, read by liveavatar/models/wan/inference_utils.py:5 at import), then
calls its `generate` (script:502-529) for each task and pipes the frames to ffmpeg.

Protocol: JSON lines. Tasks on stdin: {"task": "render", "audio", "image", "out", "prompt",
"size", "clips", "infer_frames", "sample_steps", "seed", "online_decode"} or {"task": "exit"}.
Events on the ORIGINAL stdout (upstream's own prints are sent to stderr, the batch log):
{"event": "ready", "load_s"}, {"event": "progress", "frames"}, {"event": "done", "frames",
"width", "height", "seconds", "gpu": {...}} or {"event": "error", "kind": "oom"|"crash",
"message"}. After an error the worker keeps reading; the caller decides to replace it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from typing import IO, Any

OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory")
FP8_IGNORE = ["text_embedding", "time_embedding", "time_projection", "head.head",
              "casual_audio_encoder.encoder.final_linear"]  # as the script passes them (489-495)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="avatarcli's resident LiveAvatar worker")
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--training_config", required=True)
    p.add_argument("--lora_path", default=None)
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--offload_kv_cache", action="store_true")
    p.add_argument("--t5_cpu", action="store_true")
    p.add_argument("--task", default="s2v-14B")
    # Memory levers (liveavatar_levers.py, beside this file): defaults = upstream as it is.
    p.add_argument("--resident_blocks", type=int, default=40)
    p.add_argument("--weight_storage", choices=("bf16", "int8", "fp8"), default="bf16")
    p.add_argument("--prefetch_blocks", type=int, default=1)
    p.add_argument("--encoders", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--ffmpeg", required=True)
    return p.parse_args(argv)


class Channel:
    """The protocol channel: a private copy of the original stdout."""

    def __init__(self) -> None:
        self.out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)  # from now on, anything printed (upstream prints a lot) goes to the log

    def send(self, **event: Any) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()


def load_levers() -> Any:
    """levers.py from this file's folder, by path (avatarcli is not installed)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "levers.py")
    spec = importlib.util.spec_from_file_location("avatarcli_liveavatar_levers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def levers_asked(args: argparse.Namespace) -> bool:
    return (args.resident_blocks < 40 or args.weight_storage != "bf16"
            or args.encoders != "gpu")


def build(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """WanS2V as the single-GPU script builds it, LoRA attached, fp8 converted, then the
    memory levers applied (in the order liveavatar_levers documents); also what they did."""
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():  # upstream calls dist.get_rank() inside generate
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                init_method="env://", rank=0, world_size=1)
    from liveavatar.models.wan.causal_s2v_pipeline import WanS2V
    from liveavatar.models.wan.wan_2_2.configs import WAN_CONFIGS
    from liveavatar.utils.args_config import parse_args_for_training_config

    cfg = WAN_CONFIGS[args.task]
    settings = parse_args_for_training_config(args.training_config)
    levers = load_levers() if levers_asked(args) else None
    on_host = contextlib.nullcontext()
    if levers is not None and (args.resident_blocks < 40 or args.weight_storage != "bf16"):
        # The DiT is loaded in host memory and never placed whole on the GPU.
        from liveavatar.models.wan.causal_model_s2v import CausalWanModel_S2V

        on_host = levers.dit_loaded_on_host(CausalWanModel_S2V)
    with on_host:
        pipe = WanS2V(config=cfg, checkpoint_dir=args.ckpt_dir, device_id=local_rank, rank=0,
                      t5_fsdp=False, dit_fsdp=False, use_sp=False, sp_size=1,
                      t5_cpu=args.t5_cpu, convert_model_dtype=True, single_gpu=True,
                      offload_kv_cache=args.offload_kv_cache)
    if args.lora_path:
        pipe.noise_model = pipe.add_lora_to_model(
            pipe.noise_model, lora_rank=settings["lora_rank"], lora_alpha=settings["lora_alpha"],
            lora_target_modules=settings["lora_target_modules"],
            init_lora_weights=settings["init_lora_weights"],
            pretrained_lora_path=args.lora_path, load_lora_weight_only=False)
    if args.fp8:
        if not hasattr(torch, "_scaled_mm"):
            raise RuntimeError("fp8 needs torch._scaled_mm (torch >= 2.1)")
        from liveavatar.utils.fp8_linear import replace_linear_with_scaled_fp8

        replace_linear_with_scaled_fp8(pipe.noise_model, ignore_keys=list(FP8_IGNORE))
    facts: dict[str, Any] = {}
    if levers is not None:
        swap = levers.apply_levers(pipe, resident_blocks=args.resident_blocks,
                                   weight_storage=args.weight_storage,
                                   prefetch_blocks=args.prefetch_blocks,
                                   offload_kv_cache=args.offload_kv_cache,
                                   encoders=args.encoders)
        facts = {"resident_blocks": args.resident_blocks, "weight_storage": args.weight_storage,
                 "encoders": args.encoders,
                 "placement": swap.placement() if swap is not None else None,
                 "host_bytes": swap.host_bytes() if swap is not None else 0}
    return pipe, facts


def gpu_memory() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    dev = torch.cuda.current_device()
    gib = float(2**30)
    return {"device": dev,
            "allocated_gb": round(torch.cuda.memory_allocated(dev) / gib, 3),
            "reserved_gb": round(torch.cuda.memory_reserved(dev) / gib, 3),
            "max_allocated_gb": round(torch.cuda.max_memory_allocated(dev) / gib, 3)}


def write_video(video: Any, out: str, ffmpeg: str, channel: Channel, fps: int = 25) -> tuple[int, int, int]:
    """[3, T, H, W] in [-1, 1] -> H.264 (no audio) at `out`; returns (frames, width, height)."""
    import torch

    _, frames, height, width = (int(v) for v in video.shape)
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-an", "-c:v", "libx264",
           "-preset", "veryfast", "-crf", "12", "-pix_fmt", "yuv420p", out]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    chunk = 16
    try:
        for start in range(0, frames, chunk):
            part = video[:, start:start + chunk].float().clamp(-1.0, 1.0)
            rgb = ((part + 1.0) * 127.5).round().to(dtype=torch.uint8)
            proc.stdin.write(rgb.permute(1, 2, 3, 0).contiguous().cpu().numpy().tobytes())
            channel.send(event="progress", frames=min(frames, start + chunk))
    finally:
        proc.stdin.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"ffmpeg exited {code} writing {out}: {err.strip()[-400:]}")
    return frames, width, height


def render(pipe: Any, task: dict[str, Any], args: argparse.Namespace, channel: Channel) -> None:
    from liveavatar.models.wan.wan_2_2.configs import MAX_AREA_CONFIGS, WAN_CONFIGS

    started = time.monotonic()
    cfg = WAN_CONFIGS[args.task]
    video, _ = pipe.generate(
        input_prompt=task["prompt"], ref_image_path=task["image"], audio_path=task["audio"],
        enable_tts=False, tts_prompt_audio=None, tts_prompt_text=None, tts_text=None,
        num_repeat=int(task["clips"]), pose_video=None, generate_size=task["size"],
        max_area=MAX_AREA_CONFIGS[task["size"]], infer_frames=int(task["infer_frames"]),
        shift=cfg.sample_shift, sample_solver="euler", sampling_steps=int(task["sample_steps"]),
        guide_scale=0.0, seed=int(task["seed"]), offload_model=True, init_first_frame=False,
        use_dataset=False, dataset_sample_idx=0, drop_motion_noisy=False, num_gpus_dit=1,
        enable_vae_parallel=False, input_video_for_sam2=None,
        enable_online_decode=bool(task["online_decode"]))
    frames, width, height = write_video(video, task["out"], args.ffmpeg, channel,
                                        fps=int(getattr(cfg, "sample_fps", 25)))
    del video
    channel.send(event="done", frames=frames, width=width, height=height,
                 seconds=round(time.monotonic() - started, 3), gpu=gpu_memory())


def die_with_parent() -> None:
    """torchrun starts this process in a session of its own; if torchrun dies (killed with the
    batch that owns it), this process must not live on holding the GPU (Linux prctl)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before we asked
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = parse(argv)
    channel = Channel()
    # The checkout root holds upstream's `liveavatar` package; this file's own folder (avatarcli's
    # engines, where liveavatar.py is the engine) must not shadow it.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path.insert(0, os.getcwd())
    started = time.monotonic()
    try:
        pipe, levers = build(args)
    except BaseException as exc:
        channel.send(event="error", kind=_kind(exc), message=_message(exc))
        traceback.print_exc()
        return 1
    channel.send(event="ready", load_s=round(time.monotonic() - started, 3), pid=os.getpid(),
                 gpu=gpu_memory(), levers=levers)
    for line in sys.stdin:
        if not line.strip():
            continue
        task = json.loads(line)
        if task.get("task") == "exit":
            break
        try:
            render(pipe, task, args, channel)
        except Exception as exc:
            traceback.print_exc()
            channel.send(event="error", kind=_kind(exc), message=_message(exc))
    return 0


def _kind(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return "oom" if any(m in text for m in OOM_MARKERS) else "crash"


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


if __name__ == "__main__":
    sys.exit(main())
