"""LiveAvatar (Wan2.2-S2V-14B + LoRA) driven through its own script, one torchrun per batch.

The launch is built exactly as upstream's infinite_inference_{single,multi}_gpu.sh build it,
with the traps of liveavatar-contract.md avoided: `--save_file` always set, a LOCAL LoRA
path (no hub download), no '+' in any path (upstream splits `--audio` on it), `--num_clip`
sized for the batch, the job's prepared portrait (EXIF-rotated, alpha flattened, already at
the frame size upstream will choose), the audio slice shifted so the lips match the sound, a
free rendezvous port per launch, and the output verified and normalised here, since
upstream's exit code proves nothing.

Upstream facts are cited as FILE:LINE of Alibaba-Quark/LiveAvatar at commit 9c2c38d.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shlex
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from avatarcli import gpus, procs
from avatarcli.engines.base import (
    Engine,
    Finding,
    JobInputs,
    PartTask,
    Progress,
    Resources,
    run_model,
)
from avatarcli.engines.liveavatar.options import MAX_STEPS, SIZES, LiveAvatarOptions, options_of
from avatarcli.errors import EngineError, InputError, OutOfMemoryError
from avatarcli.gpus import visible as gpus_visible
from avatarcli.media import streams
from avatarcli.options import Preset

log = logging.getLogger(__name__)

SCRIPT = "minimal_inference/s2v_streaming_interact.py"
# Clip 0 loses its first 3 decoded frames (causal_s2v_pipeline.py:1119 online decode, 1170
# deferred decode): one launch yields clips*infer_frames - 3 frames.
FIRST_CLIP_DROP = 3
# What the launch opens inside --ckpt_dir (wan_s2v_14B_modified.py:12-20; causal_s2v_pipeline.py
# 119-131 T5 and VAE, 154-162 the DiT through from_pretrained, 175-183 wav2vec2): checked
# before a launch, so a wrong folder fails in seconds instead of after loading T5.
CKPT_FILES = ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "config.json")
CKPT_DIRS = ("google/umt5-xxl", "wav2vec2-large-xlsr-53-english")
CKPT_DIT_GLOB = "diffusion_pytorch_model*.safetensors*"
NEUTRAL_PROMPT = ("A person speaking naturally to the camera, facing forward, with natural "
                  "facial expressions and subtle head movements, soft even lighting.")
ENV_VARS = {  # cron-friendly: each setting can come from the environment
    "repo": "AVATARCLI_LIVEAVATAR_REPO",
    "torchrun": "AVATARCLI_LIVEAVATAR_TORCHRUN",
    "ckpt_dir": "AVATARCLI_LIVEAVATAR_CKPT_DIR",
    "lora_path": "AVATARCLI_LIVEAVATAR_LORA",
    "prompt": "AVATARCLI_LIVEAVATAR_PROMPT",
}


def renders_resident(preset: Preset) -> bool:
    """One GPU and worker.max_batches > 1: batches render in a resident worker."""
    return preset.worker.max_batches > 1 and LiveAvatarEngine.renders_resident(preset)


def settings(opts: LiveAvatarOptions) -> dict[str, str]:
    """repo/torchrun/ckpt_dir/lora_path/prompt: the preset's value, else the environment's."""
    out = {}
    for key, var in ENV_VARS.items():
        value = str(getattr(opts, key))
        default = str(getattr(LiveAvatarOptions(), key))
        if value == default and os.environ.get(var):
            value = os.environ[var]
        out[key] = value
    for key in ("ckpt_dir", "lora_path"):  # upstream never expands '~'
        if out[key].startswith("~"):
            out[key] = str(Path(out[key]).expanduser())
    return out


def frame_size(src_w: int, src_h: int, area: int) -> tuple[int, int]:
    """(width, height) upstream renders for an image of src_w x src_h and an area key's area.

    Upstream ignores --size for the frame size: get_size_less_than_area (causal_s2v_pipeline.py
    349-400, called from get_gen_size 587-599) tries 100 scales from the largest down and keeps
    the first whose sides, each rounded UP to a multiple of 64, fit the area; an image already
    within the area is never enlarged (scales 1.0 down to 0.1).
    """
    pixels = src_w * src_h
    if pixels <= area:
        hi, lo = 1.0, 0.1
    else:  # the scale where padding both sides by 63 px still fits, and the unpadded one
        pad = 63
        a, b, c = pixels, pad * (src_w + src_h), pad * pad - area
        lo = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
        hi = math.sqrt(area / pixels)
    for i in range(100):
        scale = hi - (hi - lo) * i / 100
        w, h = -(-int(src_w * scale) // 64) * 64, -(-int(src_h * scale) // 64) * 64
        if w * h <= area:
            return w, h
    # Upstream's fallback (never reached for the 12 area keys and images of >= 64 px a side).
    aspect = src_w / src_h
    w, h = int(math.sqrt(area * aspect)) // 64 * 64, int(math.sqrt(area / aspect)) // 64 * 64
    return max(64, w), max(64, h)


@contextlib.contextmanager
def plus_free(folder: Path, tag: str) -> Iterator[Path]:
    """`folder`, or while the block runs a symlink to it whose path holds no '+'.

    Upstream splits --audio on '+' anywhere in the path and switches to its multi-speaker mode,
    which crashes after the model has loaded (causal_s2v_pipeline.py:768-769;
    s2v_streaming_interact.py:542-543). Job folders sit beside the user's output, whatever it
    is named, so every path we pass goes through a '+'-free link when needed.
    """
    if "+" not in str(folder):
        yield folder
        return
    base = Path(tempfile.gettempdir())
    if "+" in str(base):
        base = Path("/tmp")
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    link = base / f"avatarcli-{digest}-{tag}-{os.getpid()}"
    try:
        link.unlink(missing_ok=True)
        link.symlink_to(folder, target_is_directory=True)
    except OSError as exc:
        raise EngineError(f"{folder}: holds '+', which upstream would split, and a link "
                          f"without it cannot be made in {base}: {exc}") from exc
    try:
        yield link
    finally:
        with contextlib.suppress(OSError):
            link.unlink()


def launch_clips(frames: int, infer_frames: int) -> int:
    """`--num_clip` so that clips*infer_frames - 3 >= frames."""
    return max(1, math.ceil((frames + FIRST_CLIP_DROP) / infer_frames))


ADAPTER = Path(__file__).with_name("adapter.py")  # runs in LiveAvatar's env


class Adapter:
    """A resident model process: liveavatar_adapter.py under LiveAvatar's torchrun, with the
    pipeline loaded once. Talks JSON lines; its log lines go to this process's stderr (fd 2),
    which the resident worker points at the current batch's log."""

    def __init__(self, cmd: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.cmd = cmd
        self.proc = procs.start_pipe(cmd, cwd=cwd, env={**os.environ, **env})
        assert self.proc.stderr is not None
        self._forward = threading.Thread(target=self._copy_log, args=(self.proc.stderr,),
                                         name="adapter-log", daemon=True)
        self._forward.start()
        started = time.monotonic()
        ready = self.next_event()
        if ready.get("event") != "ready":
            self.close()
            raise self.error(ready, "loading the model")
        self.load_s = time.monotonic() - started
        self.gpu: dict[str, Any] = dict(ready.get("gpu") or {})
        self.levers: dict[str, Any] = dict(ready.get("levers") or {})

    @staticmethod
    def _copy_log(stream: IO[bytes]) -> None:
        for line in stream:
            with contextlib.suppress(OSError):
                os.write(2, line)

    def next_event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"event": "error", "kind": "crash",
                    "message": f"the model process exited with {code}"}
        try:
            event: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            return {"event": "error", "kind": "crash", "message": f"unreadable: {line[:200]!r}"}
        return event

    def error(self, event: dict[str, Any], doing: str) -> EngineError:
        message = f"LiveAvatar (resident) failed {doing}: {event.get('message', event)}"
        if event.get("kind") == "oom":
            return OutOfMemoryError(message)
        return EngineError(message)

    def render(self, task: dict[str, Any], progress: Callable[[int], None]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(task) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise EngineError(f"the resident model process exited ({self.proc.poll()})") from None
        while True:
            event = self.next_event()
            kind = event.get("event")
            if kind == "progress":
                progress(int(event.get("frames", 0)))
            elif kind == "done":
                self.gpu = dict(event.get("gpu") or {})
                return event
            else:
                raise self.error(event, "rendering")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b'{"task": "exit"}\n')
                self.proc.stdin.close()
        procs.stop(self.proc, grace_s=10.0)


SET_UP_FIX = ("set liveavatar.repo, ckpt_dir, lora_path and torchrun in the preset, with "
              "--set liveavatar.KEY=VALUE, or through $AVATARCLI_LIVEAVATAR_*")


class LiveAvatarEngine(Engine):
    name = "liveavatar"
    options = LiveAvatarOptions
    takes_prompt = True
    restarts = True  # each launch starts from the portrait again
    # The default batch time limit: about 50x its 2.5 frames/s on one H100.
    timeout_start_s = 1800.0
    timeout_per_frame_s = 20.0

    def __init__(self, preset: Preset) -> None:
        super().__init__(preset)
        self.opts = options_of(preset)
        self.conf = settings(self.opts)
        self._adapter: Adapter | None = None
        self._loaded_now = False

    # -- resident worker: the pipeline loaded once, batch after batch ------------------------

    @classmethod
    def renders_resident(cls, preset: Preset) -> bool:
        # One GPU only: upstream's 5-GPU mode (TPP, 5 ranks) keeps the script launch.
        return options_of(preset).gpus_per_run == 1

    # -- what the engine declares from a preset ---------------------------------------------

    @classmethod
    def validate(cls, preset: Preset) -> list[str]:
        o = options_of(preset)
        if preset.size not in SIZES:
            return [f"size must be one of LiveAvatar's area keys {', '.join(SIZES)}, "
                    f"got {preset.size!r}"]
        if not 1 <= preset.sample_steps <= MAX_STEPS:
            return [f"sample_steps must be within [1, {MAX_STEPS}] for LiveAvatar (KV caches "
                    f"exist for 4 steps), got {preset.sample_steps}"]
        if o.gpus_per_run > 1 and preset.sample_steps != MAX_STEPS:
            # TPP pipeline: DiT rank i runs only denoising step i, receiving from rank i-1 and
            # sending to rank i+1, and the VAE rank receives from rank 3
            # (causal_s2v_pipeline_tpp.py:1041, 1061-1093, 1095-1098): with fewer steps a rank
            # waits for a send that never comes, and NCCL hangs until its timeout.
            return [f"sample_steps must be exactly {MAX_STEPS} with {o.gpus_per_run} GPUs "
                    f"(each DiT GPU runs one step; other values hang upstream), "
                    f"got {preset.sample_steps}"]
        if o.gpus_per_run == 1 and not preset.offload:
            # Without --offload_model the VAE stays on the CPU where init_on_cpu left it and
            # decoding fails after all the denoising (causal_s2v_pipeline.py:961-965, 1146-1153).
            return ["offload must be true for LiveAvatar on one GPU (upstream's single-GPU path "
                    "only decodes with --offload_model True; false fails after denoising)"]
        if preset.fps != 25:
            return [f"fps must be 25 for LiveAvatar (it renders at 25 fps), got {preset.fps}"]
        return []

    @classmethod
    def resources(cls, preset: Preset) -> Resources:
        o = options_of(preset)
        if not o.fp8:
            return Resources(cpus=1, gpus=o.gpus_per_run)
        return Resources(cpus=1, gpus=o.gpus_per_run, min_compute=(8, 9),
                         min_compute_why="the preset uses fp8",
                         min_compute_fix="--set liveavatar.fp8=false")

    @classmethod
    def speed_key(cls, preset: Preset) -> dict[str, Any]:
        o = options_of(preset)
        return {"fp8": o.fp8, "offload_kv_cache": o.offload_kv_cache,
                "gpus_per_run": o.gpus_per_run}

    @classmethod
    def doctor(cls, preset: Preset) -> list[Finding]:
        """The set-up (checkout, checkpoints, LoRA, torchrun), and the host RAM one launch
        needs at the area key's own frame size (the portrait is not known here)."""
        engine = cls(preset)
        problems, warnings = engine.setup_findings()
        out = [*problems, *warnings]
        if not problems:
            conf = engine.conf
            out.insert(0, Finding("ok", f"repo {conf['repo']}, ckpt {conf['ckpt_dir']}, "
                                  f"lora {conf['lora_path']}, torchrun {conf['torchrun']}"))
        from avatarcli.engines.liveavatar import memory  # the registry imports this module

        host = memory.host_estimate(preset, total_gb=gpus.host_memory_gb())
        detail = (f"one launch needs about {host.peak_gb:.1f} GB of RAM"
                  + ("" if host.total_gb is None else f"; this machine has {host.total_gb:.1f} GB"))
        out.append(Finding("ok" if host.fits else "fail", detail, name="host memory",
                           fix="" if host.fits else "turn liveavatar.offload_kv_cache off or "
                           f"lower clips_per_batch (or set {gpus.HOST_MEM_ENV} if the machine's "
                           f"RAM is misread)"))
        return out

    def model_key(self) -> str:
        """What the loaded pipeline depends on: checkout, environment, checkpoints, LoRA,
        fp8, KV-cache placement, T5 on the CPU. Prompt, seed, size and clips are per batch."""
        o = self.opts
        return json.dumps({**{k: self.conf[k] for k in ("repo", "torchrun", "ckpt_dir",
                                                        "lora_path")},
                           "training_config": o.training_config, "fp8": o.fp8,
                           "offload_kv_cache": o.offload_kv_cache, "env": o.env,
                           "t5_cpu": "--t5_cpu" in o.extra_args,
                           "levers": [o.resident_blocks, o.weight_storage, o.prefetch_blocks,
                                      o.encoders]}, sort_keys=True)

    def take_over(self, previous: Engine) -> bool:
        if (isinstance(previous, LiveAvatarEngine) and previous._adapter is not None
                and previous._adapter.alive and previous.model_key() == self.model_key()):
            self._adapter, previous._adapter = previous._adapter, None
            return True
        return False

    def memory_report(self) -> dict[str, Any]:
        return dict(self._adapter.gpu) if self._adapter is not None else {}

    def worker_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {}
        if self._adapter is not None:
            facts["model_pid"] = self._adapter.proc.pid
            if self._loaded_now:
                facts["load_s"] = round(self._adapter.load_s, 3)
        return facts

    def close(self) -> None:
        if self._adapter is not None:
            self._adapter.close()
            self._adapter = None

    def adapter_command(self, port: str) -> tuple[list[str], dict[str, str]]:
        """The resident model process's command line and extra environment."""
        o = self.opts
        from avatarcli.media.ffmpeg_bin import ffmpeg_exe

        cmd = [self.conf["torchrun"], "--nproc_per_node=1", f"--master_port={port}",
               str(ADAPTER), "--ckpt_dir", self.conf["ckpt_dir"],
               "--training_config", str(Path(o.training_config).expanduser()),
               "--lora_path", str(self._in_repo(self.conf["lora_path"])),
               *(["--fp8"] if o.fp8 else []),
               *(["--offload_kv_cache"] if o.offload_kv_cache else []),
               *(["--t5_cpu"] if "--t5_cpu" in o.extra_args else []),
               "--resident_blocks", str(o.resident_blocks), "--weight_storage", o.weight_storage,
               "--prefetch_blocks", str(o.prefetch_blocks), "--encoders", o.encoders,
               "--ffmpeg", ffmpeg_exe()]
        env = {"ENABLE_COMPILE": "true", "NCCL_DEBUG": "WARN", **o.env}
        return cmd, env

    def _render_resident(self, task: PartTask, progress: Progress) -> None:
        b, inp, p = task.batch, task.inputs, self.preset
        self._loaded_now = False
        if self._adapter is None or not self._adapter.alive:
            cmd, env = self.adapter_command(task.env.get("MASTER_PORT") or str(procs.free_port()))
            if "CUDA_VISIBLE_DEVICES" in task.env:
                env["CUDA_VISIBLE_DEVICES"] = task.env["CUDA_VISIBLE_DEVICES"]
            log.info("starting the resident model: cd %s && %s", shlex.quote(str(self.repo)),
                     shlex.join(cmd))
            self._adapter = Adapter(cmd, cwd=self.repo, env=env)
            self._loaded_now = True
            log.info("model loaded in %.1f s%s", self._adapter.load_s,
                     f"; levers: {self._adapter.levers}" if self._adapter.levers else "")
        with plus_free(inp.job_dir, f"{b.index:04d}") as job_dir:
            inside = lambda path: str(job_dir / path.relative_to(inp.job_dir))  # noqa: E731
            spec = {"task": "render", "audio": inside(self.audio_slice(task)),
                    "image": inside(inp.portrait), "out": inside(self.raw_output(task)),
                    "prompt": task.engine_state.get("prompt") or self.prompt(inp),
                    "size": p.size, "clips": launch_clips(b.frames, p.infer_frames),
                    "infer_frames": p.infer_frames, "sample_steps": p.sample_steps,
                    "seed": p.seed, "online_decode": p.online_decode}
            self._adapter.render(spec, lambda n: progress(min(n, b.frames - 1)))

    def size_multiple(self) -> int:
        return 64  # upstream rounds width and height to multiples of 64

    def frame_size(self, area: tuple[int, int], src_w: int, src_h: int) -> tuple[int, int]:
        return frame_size(src_w, src_h, area[0] * area[1])

    @property
    def repo(self) -> Path:
        return Path(self.conf["repo"]).expanduser()

    def _in_repo(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.repo / p

    def check(self, inputs: JobInputs) -> tuple[list[str], list[str]]:
        """(problems, warnings) found before anything is launched: the set-up, then what this
        run needs of this machine (fp8-capable GPUs, host RAM for a batch)."""
        problems, warnings = self.check_setup()
        problems += self._check_fp8()
        problems += self._check_host_memory(inputs)
        return problems, warnings

    def check_setup(self) -> tuple[list[str], list[str]]:
        """(problems, warnings) of the installation and the preset alone."""
        problems, warnings = self.setup_findings()
        return [f.detail for f in problems], [f.detail for f in warnings]

    def _fix(self, key: str) -> str:
        """What to do about a problem with preset key `liveavatar.KEY` ("" : the set-up)."""
        if not key:
            return SET_UP_FIX
        name = key.removeprefix("liveavatar.")
        fix = f"set {key} in the preset or with --set {key}=..."
        if name in ENV_VARS:
            fix += f" (or ${ENV_VARS[name]})"
        return fix

    def setup_findings(self) -> tuple[list[Finding], list[Finding]]:
        """(problems, warnings) of the installation and the preset alone, each with the preset
        key that fixes it (for `avatar doctor`)."""
        problems: list[tuple[str, str]] = []  # (detail, key)
        warnings: list[Finding] = []
        if not self.conf["repo"]:
            problems.append(("liveavatar.repo is not set (preset key, --set liveavatar.repo=DIR "
                             f"or ${ENV_VARS['repo']})", "liveavatar.repo"))
        elif not (self.repo / SCRIPT).is_file():
            problems.append((f"{self.repo}: not a LiveAvatar checkout ({SCRIPT} not found)",
                             "liveavatar.repo"))
        else:
            problems += [(p, "liveavatar.ckpt_dir") for p in self._check_checkpoints()]
            if not self._in_repo(self.opts.training_config).is_file():
                problems.append((f"{self._in_repo(self.opts.training_config)}: training config "
                                 f"not found (liveavatar.training_config)",
                                 "liveavatar.training_config"))
        if not self.conf["lora_path"]:
            problems.append(("liveavatar.lora_path is not set: give a LOCAL path to the "
                             "Live-Avatar LoRA so nothing is downloaded at run time "
                             f"(or ${ENV_VARS['lora_path']})", "liveavatar.lora_path"))
        elif self.conf["repo"] and not self._in_repo(self.conf["lora_path"]).is_file():
            # Upstream torch.load()s anything that is not .safetensors: a folder fails late.
            problems.append((f"{self._in_repo(self.conf['lora_path'])}: LoRA file not found "
                             f"(liveavatar.lora_path must name the file itself, e.g. "
                             f"ckpt/LiveAvatar/liveavatar.safetensors)", "liveavatar.lora_path"))
        torchrun = self.conf["torchrun"]
        if not procs.executable(torchrun, cwd=self.conf['repo'] or None):
            problems.append((f"{torchrun}: torchrun not found (liveavatar.torchrun: the torchrun "
                             f"of LiveAvatar's own environment)", "liveavatar.torchrun"))
        o = self.opts
        if (o.resident_blocks < 40 or o.weight_storage != "bf16" or o.encoders != "gpu") \
                and not renders_resident(self.preset):
            problems.append(("liveavatar.resident_blocks, weight_storage and encoders act only "
                             "in a resident worker (one GPU, worker.max_batches > 1); upstream's "
                             "script launch would ignore them and run out of memory",
                             "liveavatar.resident_blocks"))
        change = "change the preset value named above (--set KEY=VALUE)"
        if self.preset.infer_frames % 12:
            warnings.append(Finding(
                "warn", f"infer_frames={self.preset.infer_frames} is not a multiple of 12; "
                f"upstream denoises blocks of 3 latent frames (48 is the safe value)",
                key="infer_frames", fix=change))
        from avatarcli.engines.liveavatar import memory

        warnings += [Finding("warn", w, fix=change) for w in memory.rung_warnings(self.preset)]
        return [Finding("fail", d, key=k, fix=self._fix(k)) for d, k in problems], warnings

    def _check_checkpoints(self) -> list[str]:
        ckpt = self._in_repo(self.conf["ckpt_dir"])
        if not ckpt.is_dir():
            return [f"{ckpt}: checkpoint directory not found (liveavatar.ckpt_dir)"]
        missing = [n for n in CKPT_FILES if not (ckpt / n).is_file()]
        missing += [n + "/" for n in CKPT_DIRS if not (ckpt / n).is_dir()]
        if not any(ckpt.glob(CKPT_DIT_GLOB)):
            missing.append(CKPT_DIT_GLOB)
        if missing:
            return [f"{ckpt}: not a Wan2.2-S2V-14B checkpoint folder (liveavatar.ckpt_dir): "
                    f"missing {', '.join(missing)}"]
        return []

    def _check_fp8(self) -> list[str]:
        """fp8 needs compute capability 8.9+; upstream only tests hasattr(torch, "_scaled_mm")
        (s2v_streaming_interact.py:484-485), true on an A100, which then fails at the first
        forward. Checked when GPUs can be seen; without any, the launch finds out."""
        if not self.opts.fp8:
            return []
        ids = set(gpus.visible())
        slow = [g for g in gpus.facts() if (not ids or g.index in ids)
                and g.compute_capability is not None and not gpus.fp8_capable(g.compute_capability)]
        return [f"GPU {g.index} ({g.name}) has compute capability "
                f"{g.compute_capability[0]}.{g.compute_capability[1]}; liveavatar.fp8 needs 8.9+ "
                f"(Ada/Hopper): use --set liveavatar.fp8=false or another GPU"
                for g in slow if g.compute_capability is not None]

    def _check_host_memory(self, inputs: JobInputs) -> list[str]:
        """The launch's host RAM (memory.host_estimate) against this machine's."""
        from avatarcli.engines.liveavatar import memory

        est = memory.host_estimate(self.preset, total_gb=gpus.host_memory_gb(),
                                   width=inputs.width, height=inputs.height)
        if est.fits:
            return []
        big = ", ".join(f"{k} {v:.1f}" for k, v in est.components.items())
        return [f"one launch needs about {est.peak_gb:.0f} GB of host RAM ({big} GB) and this "
                f"machine has {est.total_gb:.0f} GB: turn liveavatar.offload_kv_cache off, lower "
                f"clips_per_batch, or set {gpus.HOST_MEM_ENV} if the estimate is wrong here"]

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
        gpu_ids = gpus_visible(gpus)
        if not gpu_ids:
            gpu_ids = [str(i) for i in range(per_run)]  # let the launch find out, one at a time
        if len(gpu_ids) < per_run:
            raise InputError(f"this preset needs {per_run} GPUs per launch; "
                             f"{len(gpu_ids)} visible ({','.join(gpu_ids)})")
        groups = [gpu_ids[i:i + per_run] for i in range(0, len(gpu_ids) - per_run + 1, per_run)]
        # No MASTER_PORT: each launch asks for a free one (see command()).
        return [{"CUDA_VISIBLE_DEVICES": ",".join(g)} for g in groups]

    def audio_slice(self, task: PartTask) -> Path:
        return task.inputs.job_dir / "audio" / f"batch-{task.batch.index:04d}.wav"

    def raw_output(self, task: PartTask) -> Path:
        return task.inputs.job_dir / "raw" / f"batch-{task.batch.index:04d}.mp4"

    def slice_window(self, task: PartTask) -> tuple[float, float]:
        """(start_s, duration_s) of the batch's audio slice in the original recording.

        Output frame n of a launch is generated from audio frame n + shift of its slice
        (FIRST_CLIP_DROP frames dropped from clip 0, audio indexed from 0: see
        LiveAvatarOptions.audio_shift_frames), so the slice starts `shift` frames before the
        batch (silence before the recording for batch 0) and frame n matches the muxed sound.
        It holds exactly the clips the launch renders, silence-padded past the recording.
        """
        fps, b = task.inputs.fps, task.batch
        clips = launch_clips(b.frames, self.preset.infer_frames)
        start = (b.frame_start - self.opts.audio_shift_frames) / fps
        return start, clips * self.preset.infer_frames / fps

    def command(self, task: PartTask, *, job_dir: Path | None = None,
                port: str | None = None) -> tuple[list[str], dict[str, str]]:
        """The launch's argument list and its extra environment.

        job_dir: the job folder as the launch should see it (a '+'-free link, see plus_free);
        port: the torchrun rendezvous port (default: the slot's, else a free one).
        """
        p, o = self.preset, self.opts
        multi = o.gpus_per_run > 1
        jd = job_dir or task.inputs.job_dir
        inside = lambda path: str(jd / path.relative_to(task.inputs.job_dir))  # noqa: E731
        port = port or task.env.get("MASTER_PORT") or str(procs.free_port())
        cmd = [
            self.conf["torchrun"], f"--nproc_per_node={o.gpus_per_run}", f"--master_port={port}",
            SCRIPT,
            "--ulysses_size", "1",
            "--task", "s2v-14B",
            "--size", p.size,
            "--base_seed", str(p.seed),
            "--training_config", str(Path(o.training_config).expanduser()),
            # One GPU always offloads (presets refuse false); 5 GPUs never do, as upstream.
            "--offload_model", "False" if multi else "True",
            "--convert_model_dtype",
            "--prompt", task.engine_state.get("prompt") or self.prompt(task.inputs),
            # The prepared portrait: upright, flattened, at the planned frame size.
            "--image", inside(task.inputs.portrait),
            "--audio", inside(self.audio_slice(task)),
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
            "--save_file", inside(self.raw_output(task)),
            *o.extra_args,
        ]
        env = {"ENABLE_COMPILE": "true", "NCCL_DEBUG": "WARN", **o.env}
        if "CUDA_VISIBLE_DEVICES" in task.env:
            env["CUDA_VISIBLE_DEVICES"] = task.env["CUDA_VISIBLE_DEVICES"]
        return cmd, env

    def describe(self, task: PartTask) -> str:
        if renders_resident(self.preset):  # what starts the resident worker's model process
            cmd, env = self.adapter_command(task.env.get("MASTER_PORT") or str(procs.free_port()))
            if "CUDA_VISIBLE_DEVICES" in task.env:
                env["CUDA_VISIBLE_DEVICES"] = task.env["CUDA_VISIBLE_DEVICES"]
            assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            return (f"cd {shlex.quote(str(self.repo))} && {assigns} {shlex.join(cmd)}  "
                    f"# resident model process; batch {task.batch.index} goes to it as a task")
        cmd, env = self.command(task)
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        return f"cd {shlex.quote(str(self.repo))} && {assigns} {shlex.join(cmd)}"

    def render(self, task: PartTask, progress: Progress) -> None:
        b, inp = task.batch, task.inputs
        wav, raw = self.audio_slice(task), self.raw_output(task)
        wav.parent.mkdir(parents=True, exist_ok=True)
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.unlink(missing_ok=True)
        start_s, duration_s = self.slice_window(task)
        streams.slice_audio(inp.audio, wav, start_s=start_s, duration_s=duration_s)
        if renders_resident(self.preset):
            self._render_resident(task, progress)
        else:
            with plus_free(inp.job_dir, f"{b.index:04d}") as job_dir:
                cmd, env = self.command(task, job_dir=job_dir)
                log.info("launch: cd %s && %s", shlex.quote(str(self.repo)), shlex.join(cmd))
                run_model(cmd, cwd=self.repo, env=env, label=f"batch {b.index}: LiveAvatar")
        if not raw.is_file() or raw.stat().st_size == 0:
            raise EngineError(f"batch {b.index}: LiveAvatar exited 0 but wrote no video "
                              f"({raw}); it only logs save errors")
        try:
            got = streams.video_frames(raw)
        except Exception as exc:
            raise EngineError(f"batch {b.index}: {raw} does not decode ({exc})") from exc
        if got < b.frames:
            raise EngineError(f"batch {b.index}: {raw} has {got} frames, expected at least "
                              f"{b.frames}")
        progress(b.frames - 1)
        # The first b.frames frames are the batch (frame n matches audio frame n): the surplus
        # of the last clip is cut at the end, never at the start.
        streams.normalise(raw, task.out, frames=b.frames, width=inp.width, height=inp.height,
                        fps=inp.fps)
        progress(b.frames)
        raw.unlink(missing_ok=True)
