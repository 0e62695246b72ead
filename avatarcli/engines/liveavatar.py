"""LiveAvatar (Wan2.2-S2V-14B + LoRA) driven through its own script, one torchrun per batch.

The launch is built exactly as upstream's infinite_inference_{single,multi}_gpu.sh build it,
with the traps of liveavatar-contract.md avoided: `--save_file` always set, a LOCAL LoRA
path (no hub download), one audio file (never `a+b`), `--num_clip` sized for the batch, and
the output verified and normalised here, since upstream's exit code proves nothing.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any

from avatarcli import media, procs
from avatarcli.engines.base import Engine, JobInputs, PartTask, Progress, run_model
from avatarcli.errors import EngineError, InputError
from avatarcli.gpus import visible as visible_gpus
from avatarcli.options import LiveAvatarOptions, Preset

log = logging.getLogger(__name__)

SCRIPT = "minimal_inference/s2v_streaming_interact.py"
FIRST_CLIP_DROP = 3  # upstream drops 3 frames of clip 0: clips*infer_frames - 3 frames
BASE_PORT = 29101  # upstream's scripts use 29101 (single) and 29102 (multi)
NEUTRAL_PROMPT = ("A person speaking naturally to the camera, facing forward, with natural "
                  "facial expressions and subtle head movements, soft even lighting.")
ENV_VARS = {  # cron-friendly: each setting can come from the environment
    "repo": "AVATARCLI_LIVEAVATAR_REPO",
    "torchrun": "AVATARCLI_LIVEAVATAR_TORCHRUN",
    "ckpt_dir": "AVATARCLI_LIVEAVATAR_CKPT_DIR",
    "lora_path": "AVATARCLI_LIVEAVATAR_LORA",
    "prompt": "AVATARCLI_LIVEAVATAR_PROMPT",
}


def settings(opts: LiveAvatarOptions) -> dict[str, str]:
    """repo/torchrun/ckpt_dir/lora_path/prompt: the preset's value, else the environment's."""
    out = {}
    for key, var in ENV_VARS.items():
        value = str(getattr(opts, key))
        default = str(getattr(LiveAvatarOptions(), key))
        if value == default and os.environ.get(var):
            value = os.environ[var]
        out[key] = value
    return out


def launch_clips(frames: int, infer_frames: int) -> int:
    """`--num_clip` so that clips*infer_frames - 3 >= frames."""
    return max(1, math.ceil((frames + FIRST_CLIP_DROP) / infer_frames))


class LiveAvatarEngine(Engine):
    name = "liveavatar"

    def __init__(self, preset: Preset) -> None:
        super().__init__(preset)
        self.opts = preset.liveavatar
        self.conf = settings(self.opts)

    def size_multiple(self) -> int:
        return 64  # upstream rounds width and height to multiples of 64

    @property
    def repo(self) -> Path:
        return Path(self.conf["repo"]).expanduser()

    def _in_repo(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.repo / p

    def check(self, inputs: JobInputs) -> tuple[list[str], list[str]]:
        """(problems, warnings) found before anything is launched."""
        problems, warnings = [], []
        if not self.conf["repo"]:
            problems.append("liveavatar.repo is not set (preset key, --set liveavatar.repo=DIR "
                            f"or ${ENV_VARS['repo']})")
        elif not (self.repo / SCRIPT).is_file():
            problems.append(f"{self.repo}: not a LiveAvatar checkout ({SCRIPT} not found)")
        else:
            if not self._in_repo(self.conf["ckpt_dir"]).is_dir():
                problems.append(f"{self._in_repo(self.conf['ckpt_dir'])}: checkpoint directory "
                                f"not found (liveavatar.ckpt_dir)")
            if not self._in_repo(self.opts.training_config).is_file():
                problems.append(f"{self._in_repo(self.opts.training_config)}: training config "
                                f"not found (liveavatar.training_config)")
        if not self.conf["lora_path"]:
            problems.append("liveavatar.lora_path is not set: give a LOCAL path to the "
                            "Live-Avatar LoRA so nothing is downloaded at run time "
                            f"(or ${ENV_VARS['lora_path']})")
        elif self.conf["repo"] and not self._in_repo(self.conf["lora_path"]).is_file():
            # Upstream torch.load()s anything that is not .safetensors: a folder fails late.
            problems.append(f"{self._in_repo(self.conf['lora_path'])}: LoRA file not found "
                            f"(liveavatar.lora_path must name the file itself, e.g. "
                            f"ckpt/LiveAvatar/liveavatar.safetensors)")
        torchrun = self.conf["torchrun"]
        if not procs.executable(torchrun, cwd=self.conf['repo'] or None):
            problems.append(f"{torchrun}: torchrun not found (liveavatar.torchrun: the torchrun "
                            f"of LiveAvatar's own environment)")
        if self.preset.infer_frames % 12:
            warnings.append(f"infer_frames={self.preset.infer_frames} is not a multiple of 12; "
                            f"upstream denoises blocks of 3 latent frames (48 is the safe value)")
        return problems, warnings

    def prompt(self, inputs: JobInputs) -> str:
        """--prompt/preset prompt, else a .txt beside the portrait, else a neutral prompt."""
        if self.conf["prompt"]:
            return self.conf["prompt"]
        txt = inputs.image.with_suffix(".txt")
        if txt.is_file():
            text = txt.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text
        return NEUTRAL_PROMPT

    def prepare(self, inputs: JobInputs) -> tuple[dict[str, Any], list[str]]:
        # check() already ran before the job started; the prompt is fixed once per job.
        return {"prompt": self.prompt(inputs)}, []

    def slots(self, jobs: int, gpus: str | None) -> list[dict[str, str]]:
        """One slot per launch that may run at once: a GPU each, or 5 GPUs for one launch."""
        per_run = self.opts.gpus_per_run
        gpu_ids = visible_gpus(gpus)
        if not gpu_ids:
            gpu_ids = [str(i) for i in range(per_run)]  # let the launch find out, one at a time
        if len(gpu_ids) < per_run:
            raise InputError(f"this preset needs {per_run} GPUs per launch; "
                             f"{len(gpu_ids)} visible ({','.join(gpu_ids)})")
        groups = [gpu_ids[i:i + per_run] for i in range(0, len(gpu_ids) - per_run + 1, per_run)]
        return [{"CUDA_VISIBLE_DEVICES": ",".join(g), "MASTER_PORT": str(BASE_PORT + i)}
                for i, g in enumerate(groups)]

    def audio_slice(self, task: PartTask) -> Path:
        return task.inputs.job_dir / "audio" / f"batch-{task.batch.index:04d}.wav"

    def raw_output(self, task: PartTask) -> Path:
        return task.inputs.job_dir / "raw" / f"batch-{task.batch.index:04d}.mp4"

    def command(self, task: PartTask) -> tuple[list[str], dict[str, str]]:
        """The launch's argument list and its extra environment."""
        p, o = self.preset, self.opts
        multi = o.gpus_per_run > 1
        port = task.env.get("MASTER_PORT", str(BASE_PORT))
        cmd = [
            self.conf["torchrun"], f"--nproc_per_node={o.gpus_per_run}", f"--master_port={port}",
            SCRIPT,
            "--ulysses_size", "1",
            "--task", "s2v-14B",
            "--size", p.size,
            "--base_seed", str(p.seed),
            "--training_config", o.training_config,
            "--offload_model", "True" if p.offload and not multi else "False",
            "--convert_model_dtype",
            "--prompt", task.engine_state.get("prompt") or self.prompt(task.inputs),
            "--image", str(task.inputs.image),
            "--audio", str(self.audio_slice(task)),
            "--infer_frames", str(p.infer_frames),
            "--load_lora",
            "--lora_path_dmd", str(self._in_repo(self.conf["lora_path"])),
            "--sample_steps", str(p.sample_steps),
            "--sample_guide_scale", "0",
            "--num_clip", str(launch_clips(task.batch.frames, p.infer_frames)),
            "--num_gpus_dit", "4" if multi else "1",
            "--sample_solver", o.sample_solver,
            *(["--enable_vae_parallel"] if multi else ["--single_gpu"]),
            "--ckpt_dir", self.conf["ckpt_dir"],
            *(["--fp8"] if o.fp8 else []),
            *(["--enable_online_decode"] if p.online_decode else []),
            *(["--offload_kv_cache"] if o.offload_kv_cache else []),
            "--save_file", str(self.raw_output(task)),
            *o.extra_args,
        ]
        env = {"ENABLE_COMPILE": "true", "NCCL_DEBUG": "WARN", **o.env}
        if "CUDA_VISIBLE_DEVICES" in task.env:
            env["CUDA_VISIBLE_DEVICES"] = task.env["CUDA_VISIBLE_DEVICES"]
        return cmd, env

    def describe(self, task: PartTask) -> str:
        cmd, env = self.command(task)
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        return f"cd {shlex.quote(str(self.repo))} && {assigns} {shlex.join(cmd)}"

    def render(self, task: PartTask, progress: Progress) -> None:
        b, inp, p = task.batch, task.inputs, self.preset
        clips = launch_clips(b.frames, p.infer_frames)
        wav, raw = self.audio_slice(task), self.raw_output(task)
        wav.parent.mkdir(parents=True, exist_ok=True)
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.unlink(missing_ok=True)
        # Exactly the audio the clips need, silence-padded past the end of the recording.
        media.slice_audio(inp.audio, wav, start_s=b.start_s(inp.fps),
                          duration_s=clips * p.infer_frames / inp.fps)
        cmd, env = self.command(task)
        log.info("launch: cd %s && %s", shlex.quote(str(self.repo)), shlex.join(cmd))
        run_model(cmd, cwd=self.repo, env=env, label=f"batch {b.index}: LiveAvatar")
        if not raw.is_file() or raw.stat().st_size == 0:
            raise EngineError(f"batch {b.index}: LiveAvatar exited 0 but wrote no video "
                              f"({raw}); it only logs save errors")
        try:
            got = media.video_frames(raw)
        except Exception as exc:
            raise EngineError(f"batch {b.index}: {raw} does not decode ({exc})") from exc
        if got < b.frames:
            raise EngineError(f"batch {b.index}: {raw} has {got} frames, expected at least "
                              f"{b.frames}")
        progress(b.frames - 1)
        media.normalise(raw, task.out, frames=b.frames, width=inp.width, height=inp.height,
                        fps=inp.fps)
        progress(b.frames)
        raw.unlink(missing_ok=True)
