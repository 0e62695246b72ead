"""Stand-in for LiveAvatar's `minimal_inference/s2v_streaming_interact.py` (no model, no GPU).

It accepts the same command line as the real entry point (argument names, types, defaults,
choices), enforces the rules the real code enforces (task, world size, GPUs for the DiT,
solver, KV caches for at most 4 sampling steps, paths relative to the checkout root), and
writes a cheap synthetic video with the frame count, frame size, frame rate and audio muxing
the real code would produce. See ../README.md for the simulated modes and environment.

This file is independent code written for avatarcli's tests; it shares no code with upstream.
Each behaviour it mimics names the upstream FILE:LINE it follows (Alibaba-Quark/LiveAvatar at
commit 9c2c38d; "pipeline" is liveavatar/models/wan/causal_s2v_pipeline.py, "tpp" is
liveavatar/models/wan/causal_s2v_pipeline_tpp.py, "script" is this file's upstream twin).
"""

from __future__ import annotations

import time

START = time.time()  # before any heavy import: tests compare launch windows

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import wave  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

# ----------------------------------------------------------------------------- constants

TASKS = ("t2v-A14B", "i2v-A14B", "ti2v-5B", "s2v-14B")  # upstream WAN_CONFIGS keys
EXAMPLE_TASKS = ("s2v-14B",)  # the only task with example inputs, hence the only valid one

# --size keys, in upstream's order: "W*H" names an AREA, not the output frame size.
SIZE_KEYS = (
    "720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704",
    "1024*704", "704*1024", "720*400", "704*384", "688*368", "384*256",
)


def area_of(size_key: str) -> int:
    a, b = size_key.split("*")
    return int(a) * int(b)


# s2v-14B config values the command line falls back to when a flag is left out.
CFG_SAMPLE_STEPS = 40  # the real config says 40; only 4 KV caches exist, so this crashes
CFG_SAMPLE_SHIFT = 3.0
CFG_GUIDE_SCALE = 4.5
CFG_FRAME_NUM = 81
SAMPLE_FPS = 25  # LiveAvatar's shared config (Wan2.2 itself uses 16)
AUDIO_FEATURE_FPS = 30  # the audio encoder resamples wav2vec features to 30 per second
MOTION_FRAMES = 73
# Clip 0 loses its first 3 decoded frames (pipeline:1119, 1170) while clip r is denoised
# against audio frames r*F .. r*F+F-1 (pipeline:1000-1005): output frame n is generated from
# audio frame n+3 of the file it was given. The synthetic frames below carry that loudness.
FIRST_CLIP_DROP = 3
KV_CACHE_STEPS = 4  # one rolling KV cache per sampling step, four of them (pipeline:981-988)
# What WanS2V opens inside --ckpt_dir, in the order it opens them (pipeline:119-131 T5 and its
# tokenizer, the VAE; 154-162 the DiT's config and shards; 175-183 wav2vec2).
CKPT_OPENED = ("models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl", "Wan2.1_VAE.pth",
               "config.json", "wav2vec2-large-xlsr-53-english")
DIT_GPUS_MULTI = 4  # the TPP pipeline: 4 DiT ranks + 1 VAE rank
MIN_WORLD_MULTI = 5

EXAMPLE_PROMPT = "A white cat wearing sunglasses sits on a surfboard at the beach."
EXAMPLE_IMAGE = "examples/boy.jpg"
EXAMPLE_AUDIO = "examples/boy.wav"

MODES = ("success", "oom", "crash", "nofile", "short", "noaudio", "hang")
# NCCL's default collective timeout (torch.distributed, 10 minutes); the stand-in's is shorter
# when LIVEAVATAR_STANDIN_NCCL_TIMEOUT says so.
NCCL_TIMEOUT_S = 600.0
ENV_RECORDED = (
    "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
    "LOCAL_WORLD_SIZE", "ENABLE_COMPILE", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS",
    "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS", "HF_HUB_OFFLINE",
    "LIVEAVATAR_STANDIN_MODE", "LIVEAVATAR_STANDIN_OOM_UNTIL", "LIVEAVATAR_STANDIN_DELAY",
    "LIVEAVATAR_STANDIN_GPUS", "LIVEAVATAR_STANDIN_NCCL_TIMEOUT",
)

OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 4.17 GiB. GPU {gpu} has a total capacity of "
    "23.55 GiB of which 1.02 GiB is free. Including non-PyTorch memory, this process has "
    "22.52 GiB memory in use. Of the allocated memory 21.87 GiB is allocated by PyTorch, and "
    "312.45 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is "
    "large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)

log = logging.getLogger("s2v_streaming_interact")


class StandinRefusal(RuntimeError):
    """A command line the stand-in rejects on purpose (avatarcli must never build it)."""


# ----------------------------------------------------------------------------- command line


def str2bool(value: str | bool) -> bool:
    """Upstream's boolean flag parser: yes/true/t/y/1 and no/false/f/n/0, any case."""
    if isinstance(value, bool):
        return value
    text = value.lower()
    if text in {"yes", "true", "t", "y", "1"}:
        return True
    if text in {"no", "false", "f", "n", "0"}:
        return False
    raise argparse.ArgumentTypeError("Boolean value expected (True/False)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="LiveAvatar s2v streaming inference (avatarcli test stand-in)")
    add = p.add_argument
    add("--task", type=str, default="t2v-A14B", choices=list(TASKS))
    add("--size", type=str, default="1280*720", choices=list(SIZE_KEYS),
        help="Output AREA key; width/height follow the image's aspect ratio.")
    add("--frame_num", type=int, default=None)
    add("--ckpt_dir", type=str, default=None)
    add("--offload_model", type=str2bool, default=None)
    add("--ulysses_size", type=int, default=1)
    add("--t5_fsdp", action="store_true", default=False)
    add("--t5_cpu", action="store_true", default=False)
    add("--dit_fsdp", action="store_true", default=False)
    add("--save_file", type=str, default=None)
    add("--save_dir", type=str, default=None)
    add("--prompt", type=str, default=None)
    add("--use_prompt_extend", action="store_true", default=False)
    add("--prompt_extend_method", type=str, default="local_qwen",
        choices=["dashscope", "local_qwen"])
    add("--prompt_extend_model", type=str, default=None)
    add("--prompt_extend_target_lang", type=str, default="zh", choices=["zh", "en"])
    add("--base_seed", type=int, default=-1)
    add("--image", type=str, default=None)
    add("--sample_solver", type=str, default="euler", choices=["euler", "unipc", "dpm++"])
    add("--sample_steps", type=int, default=None)
    add("--sample_shift", type=float, default=None)
    add("--sample_guide_scale", type=float, default=None)
    add("--convert_model_dtype", action="store_true", default=False)
    add("--num_clip", type=int, default=None)
    add("--audio", type=str, default=None)
    add("--enable_tts", action="store_true", default=False)
    add("--tts_prompt_audio", type=str, default=None)
    add("--tts_prompt_text", type=str, default=None)
    add("--tts_text", type=str, default=None)
    add("--pose_video", type=str, default=None)
    add("--start_from_ref", action="store_true", default=False)
    add("--infer_frames", type=int, default=80)
    add("--load_lora", action="store_true", default=False)
    add("--lora_path", type=str, default=None)
    add("--lora_path_dmd", type=str, default=None)
    add("--training_config", type=str, default=None)
    add("--use_dataset", action="store_true", default=False)
    add("--dataset_sample_idx", type=int, default=0)
    add("--drop_motion_noisy", action="store_true", default=False)
    add("--single_gpu", action="store_true", default=False)
    add("--using_merged_ckpt", action="store_true", default=False)
    add("--num_gpus_dit", type=int, default=4)
    add("--enable_vae_parallel", action="store_true", default=False)
    add("--offload_kv_cache", action="store_true", default=False)
    add("--enable_online_decode", action="store_true", default=False)
    add("--fp8", action="store_true", default=False)
    return p


def validate(args: argparse.Namespace) -> None:
    """The checks and fallbacks the real script applies right after parsing."""
    assert args.ckpt_dir is not None, "Please specify the checkpoint directory."
    assert args.task in TASKS, f"Unsupport task: {args.task}"
    assert args.task in EXAMPLE_TASKS, f"Unsupport task: {args.task}"
    if args.prompt is None:
        args.prompt = EXAMPLE_PROMPT
    if args.image is None:
        args.image = EXAMPLE_IMAGE
    if args.audio is None and not args.enable_tts:
        args.audio = EXAMPLE_AUDIO
    if args.sample_steps is None:
        args.sample_steps = CFG_SAMPLE_STEPS
    if args.sample_shift is None:
        args.sample_shift = CFG_SAMPLE_SHIFT
    if args.sample_guide_scale is None:
        args.sample_guide_scale = CFG_GUIDE_SCALE
    if args.frame_num is None:
        args.frame_num = CFG_FRAME_NUM
    if args.base_seed < 0:
        args.base_seed = random.randint(0, sys.maxsize)


def split_speakers(audio: str) -> list[str]:
    """Upstream treats any '+' in --audio as 'a.wav+b.wav' (pipeline:768-769, after the model
    has loaded; script:542-543 again at save): each piece is encoded as its own speaker, then
    SAM2 routes the speakers. A path holding '+' (a folder name too) thus fails late."""
    return audio.split("+") if "+" in audio else [audio]


def read_training_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    with open(path, encoding="utf-8") as f:  # relative to cwd, like upstream
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise TypeError(f"{path}: training config must be a mapping")
    return data


# ----------------------------------------------------------------------------- geometry


def _ceil64(n: int) -> int:
    return n + (64 - n % 64) % 64


def output_size(img_h: int, img_w: int, area: int) -> tuple[int, int]:
    """(height, width) of the generated video for an image of img_h x img_w and an area key.

    Same arithmetic as the real pipeline's get_size_less_than_area (pipeline:349-400): try 100 scales from the largest that fits the area
    down to one that leaves room for padding, scale, round each side UP to a multiple of 64,
    and keep the first whose padded area fits.
    """
    pixels = img_h * img_w
    if pixels <= area:
        top, bottom = 1.0, 0.1
    else:
        pad = 63
        qa = pixels
        qb = pad * (img_h + img_w)
        qc = pad**2 - area
        bottom = (-qb + math.sqrt(qb**2 - 2 * qa * qc)) / (2 * qa)
        top = math.sqrt(area / pixels)
    for i in range(100):
        s = top - (top - bottom) * i / 100
        h, w = _ceil64(int(img_h * s)), _ceil64(int(img_w * s))
        if h * w <= area:
            return h, w
    aspect = img_w / img_h
    w = int((area * aspect) ** 0.5 // 64 * 64)
    h = int((area / aspect) ** 0.5 // 64 * 64)
    if w >= img_w or h >= img_h:
        w, h = int(img_w // 64 * 64), int(img_h // 64 * 64)
    return h, w


def fit_reference(image: Any, height: int, width: int) -> np.ndarray:
    """Scale the short side to min(height, width), then centre-crop (zero-pad) to the frame:
    transforms.Resize(min(H, W)) then CenterCrop((H, W)) (pipeline:752-753, 884)."""
    from PIL import Image

    short = min(height, width)
    iw, ih = image.size
    if iw <= ih:
        nw, nh = short, int(short * ih / iw)
    else:
        nw, nh = int(short * iw / ih), short
    scaled = np.asarray(image.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.uint8)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = round((nh - height) / 2), round((nw - width) / 2)
    src_y0, src_x0 = max(top, 0), max(left, 0)
    dst_y0, dst_x0 = max(-top, 0), max(-left, 0)
    ch, cw = min(height - dst_y0, nh - src_y0), min(width - dst_x0, nw - src_x0)
    out[dst_y0:dst_y0 + ch, dst_x0:dst_x0 + cw] = scaled[src_y0:src_y0 + ch, src_x0:src_x0 + cw]
    return out


# ----------------------------------------------------------------------------- audio


@dataclass
class Audio:
    samples16k: int  # length after resampling to 16 kHz, as the audio encoder loads it
    seconds: float
    rms_per_frame: np.ndarray = field(repr=False)  # 0..1 loudness per 1/25 s


def _ffmpeg_for_writing() -> str:
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def _ffmpeg_for_muxing() -> str:
    # Upstream runs plain `ffmpeg` from PATH for the mux (and silently skips the audio when
    # there is none); the stand-in falls back to the bundled binary instead.
    return shutil.which("ffmpeg") or _ffmpeg_for_writing()


def read_audio(path: str) -> Audio:
    if not os.path.exists(path):
        raise FileNotFoundError(f"[Errno 2] No such file or directory: '{path}'")
    try:
        with wave.open(path, "rb") as w:
            rate, width, chans, n = (w.getframerate(), w.getsampwidth(), w.getnchannels(),
                                     w.getnframes())
            raw = w.readframes(n)
        if width == 2:
            pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        elif width == 1:
            pcm = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
        elif width == 4:
            pcm = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
        else:
            raise wave.Error(f"unsupported sample width {width}")
        pcm = pcm.reshape(-1, chans).mean(axis=1)
    except (wave.Error, EOFError):
        # Not a plain PCM WAV (mp3, float WAV...): decode like librosa would, via ffmpeg.
        proc = subprocess.run(
            [_ffmpeg_for_writing(), "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0",
             "-ac", "1", "-ar", "16000", "-f", "f32le", "-"],
            capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"cannot decode audio {path}: "
                               f"{proc.stderr.decode(errors='replace')[-300:]}") from None
        pcm, rate = np.frombuffer(proc.stdout, dtype="<f4"), 16000
    n16 = len(pcm) if rate == 16000 else math.ceil(len(pcm) * 16000 / rate)
    hop = rate / SAMPLE_FPS
    count = max(1, math.ceil(len(pcm) / hop))
    rms = np.array([
        float(np.sqrt(np.mean(np.square(seg)))) if len(seg := pcm[int(i * hop):int((i + 1) * hop)])
        else 0.0
        for i in range(count)
    ], dtype=np.float32)
    peak = float(rms.max()) if rms.size else 0.0
    return Audio(n16, len(pcm) / rate, rms / peak if peak > 0 else rms)


def available_clips(samples16k: int, infer_frames: int) -> int:
    """Clips the audio supports, as the real audio encoder counts them.

    wav2vec2 turns 16 kHz samples into ~50 feature frames/s (7 strided convolutions, no
    padding); those are resampled to 30/s and cut into buckets of infer_frames video frames
    at 25 fps. Close to floor(seconds*25/infer_frames)+1, but one lower when the audio is an
    exact multiple of a clip (the conv stack loses ~1 frame).
    """
    n = samples16k
    for kernel, stride in ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)):
        n = (n - kernel) // stride + 1
    if n <= 0:
        raise RuntimeError(
            "Calculated padded input size per channel: (1). Kernel size: (2). "
            "Kernel size can't be greater than actual input size (audio too short)")
    feature_frames = int(n / float(50) * AUDIO_FEATURE_FPS)
    return int(feature_frames / (infer_frames * (AUDIO_FEATURE_FPS / SAMPLE_FPS))) + 1


# ----------------------------------------------------------------------------- modes/env


@dataclass
class Launch:
    rank: int
    world_size: int
    local_rank: int
    mode: str
    record: dict[str, Any]


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


def bump_counter() -> int | None:
    """Add this launch to $LIVEAVATAR_STANDIN_COUNTER; return how many launches came before."""
    path = os.environ.get("LIVEAVATAR_STANDIN_COUNTER")
    if not path:
        return None
    import fcntl

    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        before = int(text) if text else 0
        f.seek(0)
        f.truncate()
        f.write(f"{before + 1}\n")
        f.flush()
    return before


def choose_mode(record: dict[str, Any]) -> str:
    mode = os.environ.get("LIVEAVATAR_STANDIN_MODE", "").strip() or "success"
    if mode not in MODES:
        raise ValueError(f"LIVEAVATAR_STANDIN_MODE={mode!r}: expected one of {', '.join(MODES)}")
    before = bump_counter()
    record["launches_before"] = before
    until = os.environ.get("LIVEAVATAR_STANDIN_OOM_UNTIL", "").strip()
    if until:
        if before is None:
            raise ValueError("LIVEAVATAR_STANDIN_OOM_UNTIL needs LIVEAVATAR_STANDIN_COUNTER "
                             "(a file counting launches)")
        if before < int(until):
            mode = "oom"
    return mode


def check_visible_gpus(local_rank: int) -> None:
    """What torch.cuda.set_device(local_rank) would say, for a machine with
    $LIVEAVATAR_STANDIN_GPUS GPUs (default 8) narrowed by CUDA_VISIBLE_DEVICES."""
    total = int(os.environ.get("LIVEAVATAR_STANDIN_GPUS", "8") or 8)
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        visible = total
    else:
        ids = [x.strip() for x in cvd.split(",") if x.strip()]
        good = []
        for x in ids:  # CUDA stops at the first invalid entry
            if not x.isdigit() or int(x) >= total or int(x) in good:
                break
            good.append(int(x))
        visible = len(good)
    if visible == 0:
        raise RuntimeError("No CUDA GPUs are available")
    if local_rank >= visible:
        raise RuntimeError(
            "CUDA error: invalid device ordinal\nCUDA kernel errors might be asynchronously "
            "reported at some other API call, so the stacktrace below might be incorrect.")


def write_record(record: dict[str, Any]) -> None:
    folder = os.environ.get("LIVEAVATAR_STANDIN_RECORD")
    if not folder:
        return
    record["end"] = time.time()
    os.makedirs(folder, exist_ok=True)
    name = f"launch-{int(START * 1e6)}-{os.getpid()}.json"
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(folder, name))


# ----------------------------------------------------------------------------- "model"


class FakeS2V:
    """Stands for the WanS2V pipeline: checks its inputs, fails where the real one fails."""

    def __init__(self, args: argparse.Namespace, launch: Launch) -> None:
        self.args, self.launch = args, launch
        ckpt = args.ckpt_dir
        for name in CKPT_OPENED:  # the first missing one fails, as upstream's loaders do
            if not os.path.exists(os.path.join(ckpt, name)):
                raise FileNotFoundError(
                    f"[Errno 2] No such file or directory: '{os.path.join(ckpt, name)}'")
        log.info("Creating WanModel from %s", ckpt)
        load = _env_float("LIVEAVATAR_STANDIN_LOAD_S", 0.0)  # "loading the weights"
        if load > 0:
            time.sleep(load)

    def load_lora(self, path: str, settings: dict[str, Any]) -> None:
        print(f"Use LoRA: lora path: {path}, lora rank:", settings["lora_rank"],
              ", lora alpha: ", settings["lora_alpha"])
        hub_like = "/" in path and not path.startswith(("/", "."))
        if hub_like and not os.path.exists(path):
            print(f"Downloading from HF Hub: {path}")
            self.launch.record["lora_source"] = "hub"
            if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
                print("Failed to download from HF Hub: offline mode is enabled, "
                      "treating as local path")
                raise FileNotFoundError(f"[Errno 2] No such file or directory: '{path}'")
            return
        self.launch.record["lora_source"] = "local"
        if os.path.isdir(path):  # the loader torch.load()s anything not .safetensors
            raise IsADirectoryError(f"[Errno 21] Is a directory: '{path}'")
        if not os.path.exists(path):
            raise FileNotFoundError(f"[Errno 2] No such file or directory: '{path}'")

    def generate(self, mode: str) -> tuple[int, int, int, int, Audio]:
        """Returns (clips, frames, height, width, audio) of the video the model would make."""
        from PIL import Image

        args = self.args
        # get_gen_size (pipeline:587-599) on Image.open(...).convert('RGB'): no EXIF transpose.
        height, width = output_size(*self.image_hw(), area_of(args.size))
        speakers = split_speakers(args.audio)
        audios = [read_audio(path) for path in speakers]  # encode_audio per piece (pipeline:773-774)
        if len(audios) > 1:
            raise NotImplementedError(
                f"stand-in: multi-speaker audio {speakers!r} needs SAM2 routing (pipeline:786-800),"
                f" which is not simulated")
        audio = audios[0]
        if args.sample_solver != "euler":
            raise NotImplementedError("Unsupported solver.")
        clips = available_clips(audio.samples16k, args.infer_frames)
        if args.num_clip is not None and args.num_clip <= clips:
            clips = args.num_clip
        log.info("stand-in: %d clip(s) of %d frames at %dx%d", clips, args.infer_frames,
                 width, height)
        if args.infer_frames % 12:
            log.warning("stand-in: infer_frames=%d is not a multiple of 12 (3 latent frames "
                        "per block): the real model leaves part of each clip undenoised",
                        args.infer_frames)
        if mode == "oom":
            self._denoise_block(oom=True)
        if mode == "crash":
            self._load_weights_broken()
        if mode == "hang":
            while True:
                time.sleep(1.0)
        if clips > 0 and args.sample_steps > KV_CACHE_STEPS:
            caches = {str(i + 1): None for i in range(KV_CACHE_STEPS)}
            for step in range(args.sample_steps):
                _ = caches[str(step + 1)]  # KeyError: '5', as upstream
        if self.launch.world_size > 1 and args.sample_steps != KV_CACHE_STEPS:
            self._tpp_wait_forever()
        delay = _env_float("LIVEAVATAR_STANDIN_DELAY", 0.0)
        rate = _env_float("LIVEAVATAR_STANDIN_RENDER_FPS", 0.0)  # frames/s of "denoising"
        frames = clips * args.infer_frames - FIRST_CLIP_DROP
        delay += frames / rate if rate > 0 else 0.0
        if delay > 0:
            time.sleep(delay)
        if self.launch.world_size == 1 and not args.offload_model:
            # One GPU: the VAE was sent to the CPU for denoising (init_on_cpu; pipeline:961-965)
            # and only comes back with offload_model (pipeline:1146-1153): the deferred decode
            # feeds it CUDA latents (pipeline:1158-1161) after all the denoising.
            raise RuntimeError(
                "Input type (CUDABFloat16Type) and weight type (CPUBFloat16Type) should be the "
                "same or input should be a MKLDNN tensor and weight is a dense tensor")
        if clips <= 0:
            raise RuntimeError("torch.cat(): expected a non-empty list of Tensors")
        if args.infer_frames <= FIRST_CLIP_DROP:
            raise RuntimeError(f"infer_frames={args.infer_frames} leaves no frames")
        self.reference = fit_reference(Image.open(args.image).convert("RGB"), height, width)
        return clips, clips * args.infer_frames - FIRST_CLIP_DROP, height, width, audio

    def _tpp_wait_forever(self) -> None:
        """TPP: DiT rank i runs only step i, receiving from rank i-1 and sending to i+1, and
        the VAE rank receives from rank 3 (tpp:1041, 1061-1093, 1095-1098). With fewer than 4
        steps some rank waits for a send that never comes until NCCL's watchdog gives up."""
        timeout = _env_float("LIVEAVATAR_STANDIN_NCCL_TIMEOUT", NCCL_TIMEOUT_S)
        log.info("stand-in: rank %d waits in dist.recv (sample_steps=%d, 4 DiT ranks)",
                 self.launch.rank, self.args.sample_steps)
        time.sleep(timeout)
        raise RuntimeError(
            f"[Rank {self.launch.rank}] Watchdog caught collective operation timeout: "
            f"WorkNCCL(OpType=RECV, Timeout(ms)={int(timeout * 1000)}) ran for "
            f"{int(timeout * 1000)} milliseconds before timing out.")

    def image_hw(self) -> tuple[int, int]:
        from PIL import Image

        with Image.open(self.args.image) as im:
            return im.size[1], im.size[0]

    def _denoise_block(self, *, oom: bool) -> None:
        self._attention_forward(oom=oom)

    def _attention_forward(self, *, oom: bool) -> None:
        import torch

        if oom:
            raise torch.OutOfMemoryError(OOM_MESSAGE.format(gpu=self.launch.local_rank))

    def _load_weights_broken(self) -> None:
        raise RuntimeError(
            "Error(s) in loading state_dict for WanModel_S2V:\n\tsize mismatch for "
            "patch_embedding.weight: copying a param with shape torch.Size([5120, 36, 1, 2, 2]) "
            "from checkpoint, the shape in current model is torch.Size([5120, 16, 1, 2, 2]).")


# ----------------------------------------------------------------------------- output


def synthetic_frames(reference: np.ndarray, count: int, infer_frames: int,
                     loudness: np.ndarray) -> Iterator[np.ndarray]:
    """The reference image with: a progress bar (bottom), a box that grows with the audio's
    loudness (the 'mouth'), a clip colour tag (top right) and the frame index in binary
    (top left, 12 white/black squares, most significant bit first)."""
    h, w = reference.shape[:2]
    sq = max(2, min(16, w // 24))
    palette = ((230, 60, 60), (60, 200, 60), (60, 90, 230), (230, 200, 40))
    for i in range(count):
        frame = reference.copy()
        frame[h - 8:, : max(1, (i + 1) * w // count)] = (255, 255, 255)
        frame[h - 8:, max(1, (i + 1) * w // count):] = (0, 0, 0)
        clip = (i + FIRST_CLIP_DROP) // infer_frames
        frame[:sq, w - 3 * sq:] = palette[clip % len(palette)]
        level = float(loudness[i]) if i < len(loudness) else 0.0
        mh = 2 + int(level * h / 6)
        cy, cx = int(h * 0.7), w // 2
        frame[cy - mh // 2: cy + (mh + 1) // 2, cx - w // 10: cx + w // 10] = (120, 20, 40)
        for bit in range(12):
            on = (i >> (11 - bit)) & 1
            frame[:sq, bit * sq:(bit + 1) * sq] = 255 if on else 0
        yield frame


def save_video(path: str, frames: Iterator[np.ndarray], height: int, width: int) -> None:
    """Write H.264/yuv420p at 25 fps; like upstream, failures are logged, not raised."""
    cmd = [_ffmpeg_for_writing(), "-nostdin", "-v", "error", "-y", "-f", "rawvideo",
           "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(SAMPLE_FPS), "-i", "-",
           "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "10", path]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        try:
            for frame in frames:
                proc.stdin.write(frame.tobytes())
        except BrokenPipeError:
            pass
        proc.stdin.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.wait() != 0:
            raise OSError(f"ffmpeg exited {proc.returncode}: {err.strip()[-400:]}")
    except Exception as exc:
        log.info("save_video failed, error: %s", exc)


def merge_video_audio(video: str, audio: str, *, fail: bool = False) -> None:
    """Mux the audio in place (`-c:v copy -c:a aac -shortest`); errors only logged, except a
    missing video or audio file, which upstream raises before its try block."""
    if not os.path.exists(video):
        raise FileNotFoundError(f"video file {video} does not exist")
    if not os.path.exists(audio):
        raise FileNotFoundError(f"audio file {audio} does not exist")
    base, ext = os.path.splitext(video)
    temp = f"{base}_temp{ext}"
    try:
        log.info("Start merging video and audio...")
        if fail:
            raise RuntimeError("FFmpeg execute failed: stand-in mode 'noaudio'")
        cmd = [_ffmpeg_for_muxing(), "-y", "-i", video, "-i", audio, "-c:v", "copy",
               "-c:a", "aac", "-b:a", "192k", "-map", "0:v:0", "-map", "1:a:0", "-shortest",
               temp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"FFmpeg execute failed: {proc.stderr[-400:]}")
        shutil.move(temp, video)
        log.info("Merge completed, saved to %s", video)
    except Exception as exc:
        if os.path.exists(temp):
            os.remove(temp)
        log.error("merge_video_audio failed with error: %s", exc)


def default_save_file(args: argparse.Namespace) -> str:
    """Upstream's name when --save_file is left out (crashes if --lora_path_dmd is unset)."""
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    prompt = args.prompt.replace(" ", "_").replace("/", "_")[:50]
    name = f"{stamp}_{args.sample_steps}step_{prompt}"
    parts = args.lora_path_dmd.split("/")  # AttributeError on None, as upstream
    if args.lora_path_dmd.endswith(".pt") and len(parts) >= 3:
        suffix = parts[-3] + "_" + parts[-1].split(".")[0]
        name = name + "_" + suffix
        if args.save_dir is None:
            args.save_dir = "./output/" + suffix + "/"
    elif args.save_dir is None:
        args.save_dir = "./output/"
    os.makedirs(args.save_dir, exist_ok=True)
    return args.save_dir + name + ".mp4"  # plain concatenation: a save_dir needs its '/'


# ----------------------------------------------------------------------------- main


def check_layout(args: argparse.Namespace, world_size: int) -> None:
    """Upstream's process-layout rules: 1 process (single GPU) or >= 5 (4 DiT + 1 VAE)."""
    if world_size > 1:
        assert world_size >= MIN_WORLD_MULTI, (
            "At least 5 GPUs are supported for distributed inference.")
        assert args.num_gpus_dit == DIT_GPUS_MULTI, (
            "Only 4 GPUs are supported for distributed inference.")
        assert args.enable_vae_parallel is True, (
            "VAE parallel is required for distributed inference.")
        args.single_gpu = False
    else:
        assert not (args.t5_fsdp or args.dit_fsdp), (
            "t5_fsdp and dit_fsdp are not supported in non-distributed environments.")
        assert not args.ulysses_size > 1, (
            "sequence parallel are not supported in non-distributed environments.")
        args.enable_vae_parallel = False
        args.num_gpus_dit = 1
        args.single_gpu = True
    if args.ulysses_size > 1:
        raise AssertionError("Sequence parallel is not supported.")


def run(args: argparse.Namespace, settings: dict[str, Any], launch: Launch) -> None:
    rank, world_size = launch.rank, launch.world_size
    print(f"world_size: {world_size}")
    if args.offload_model is None:
        args.offload_model = world_size == 1
        log.info("offload_model is not specified, set to %s.", args.offload_model)
    check_visible_gpus(launch.local_rank)  # torch.cuda.set_device(local_rank)
    # Upstream asserts these right after init_process_group; every rank fails alike, so the
    # stand-in checks them first and skips the torch import for a rejected layout.
    check_layout(args, world_size)

    import torch.distributed as dist  # late: argument errors stay cheap

    # Upstream uses NCCL; gloo is the CPU equivalent and fails the same way on a bad port.
    dist.init_process_group(backend="gloo", init_method="env://", rank=rank,
                            world_size=world_size)
    try:
        if world_size > 1:
            print("Using TPP distributed inference.")
        else:
            print(f"Using single GPU inference with offload mode: {args.offload_model}")
        shared = [args.base_seed, launch.mode] if rank == 0 else [None, None]
        dist.broadcast_object_list(shared, src=0)
        args.base_seed, mode = shared
        launch.mode = mode
        launch.record["mode"] = mode
        log.info("Generation job args: %s", args)
        log.info("Input prompt: %s", args.prompt)
        if args.enable_tts:
            raise NotImplementedError("stand-in: --enable_tts (CosyVoice) is not simulated")
        log.info("Input image: %s", args.image)
        log.info("Creating WanS2V pipeline.")
        model = FakeS2V(args, launch)
        if args.load_lora and args.lora_path_dmd is not None:
            model.load_lora(args.lora_path_dmd, settings)
        log.info("Generating video ...")
        clips, frames, height, width, audio = model.generate(mode)
        launch.record.update(clips=clips, frames_generated=frames, height=height, width=width,
                             audio_seconds=audio.seconds)
        print("denoising video done")
        print(f"rank: {rank}")
        if args.enable_vae_parallel:
            save_rank = args.num_gpus_dit
        else:
            save_rank = 0 if world_size == 1 else args.num_gpus_dit - 1
        launch.record["save_rank"] = save_rank
        if args.save_file is None:
            args.save_file = default_save_file(args)
        launch.record["save_file"] = os.path.abspath(args.save_file)
        if rank == save_rank:
            save(args, model, mode, clips, frames, height, width, audio, launch)
        print(f"rank {rank} done, waiting for other ranks to finish...")
        print(f"rank {rank} start destroying process group...")
    finally:
        dist.destroy_process_group()
    log.info("Finished.")


def save(args: argparse.Namespace, model: FakeS2V, mode: str, clips: int, frames: int,
         height: int, width: int, audio: Audio, launch: Launch) -> None:
    written = frames if mode != "short" else max(1, frames // 2)
    launch.record["frames_written"] = 0 if mode == "nofile" else written
    log.info("Saving generated video to %s", args.save_file)
    if mode == "nofile":  # a save error swallowed after logging success-looking lines
        log.info("Merge completed, saved to %s", args.save_file)
        return
    # Output frame n carries the loudness of audio frame n + 3 (see FIRST_CLIP_DROP).
    save_video(args.save_file,
               synthetic_frames(model.reference, written, args.infer_frames,
                                audio.rms_per_frame[FIRST_CLIP_DROP:]),
               height, width)
    merge_video_audio(args.save_file, args.audio, fail=mode == "noaudio")


def main(argv: list[str] | None = None) -> int:
    rank_env = int(os.getenv("RANK", "0"))
    world_size = int(os.getenv("WORLD_SIZE", "1"))
    rank = 0 if world_size == 1 else rank_env
    local_rank = int(os.getenv("LOCAL_RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.ERROR,
        format="[%(asctime)s] %(levelname)s: %(message)s",
        handlers=[logging.StreamHandler(stream=sys.stdout)])
    record: dict[str, Any] = {
        "argv": list(sys.argv if argv is None else [sys.argv[0], *argv]),
        "cwd": os.getcwd(),
        "env": {k: os.environ.get(k) for k in ENV_RECORDED},
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "rank": rank,
        "world_size": world_size,
        "start": START,
        "outcome": "running",
    }
    launch = Launch(rank, world_size, local_rank, "success", record)

    def on_sigterm(signum: int, _frame: object) -> None:
        # torchrun forwards SIGTERM when it is stopped: keep the record, then die of it.
        record["outcome"] = "terminated by SIGTERM"
        if rank == 0:
            with contextlib.suppress(OSError):
                write_record(record)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        settings = read_training_config(args.training_config)  # relative to cwd
        launch.mode = choose_mode(record) if rank == 0 else "success"
        record["mode"] = launch.mode
        run(args, settings, launch)
        record["outcome"] = "ok"
        return 0
    except SystemExit as exc:
        record["outcome"] = f"exit {exc.code}"
        raise
    except BaseException as exc:
        record["outcome"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        if rank == 0:
            with contextlib.suppress(OSError):
                write_record(record)


if __name__ == "__main__":
    sys.exit(main())
