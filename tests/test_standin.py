"""The LiveAvatar stand-in (tests/liveavatar_standin) behaves like the real command line.

Every scenario is launched exactly as upstream's scripts launch the model, through
`torchrun --nproc_per_node=N --master_port=P minimal_inference/s2v_streaming_interact.py ...`
from the checkout root. The launches are slow to start (torchrun + torch import), so one
module-scoped fixture runs them all concurrently and the tests only inspect the results.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

STANDIN = Path(__file__).resolve().parent / "liveavatar_standin"
SCRIPT = "minimal_inference/s2v_streaming_interact.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
FPS = 25
OOM_TEXT = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.17 GiB."


# ----------------------------------------------------------------------------- helpers


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def count_frames(path: Path) -> int:
    proc = subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path), "-map", "0:v:0",
         "-f", "null", "-"], capture_output=True, text=True, check=True)
    found = re.findall(r"frame=\s*(\d+)", proc.stderr)
    assert found, proc.stderr[-500:]
    return int(found[-1])


def streams(path: Path) -> str:
    """The `Stream #...` lines ffmpeg prints for a file."""
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)],
                          capture_output=True, text=True, check=False)
    return "\n".join(line for line in proc.stderr.splitlines() if "Stream #" in line)


def video_size(path: Path) -> tuple[int, int]:
    m = re.search(r"Video: .*?, (\d+)x(\d+)", streams(path))
    assert m, streams(path)
    return int(m.group(1)), int(m.group(2))


def make_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(round(seconds * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * envelope * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def make_image(path: Path, width: int, height: int) -> Path:
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    img[..., 2] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    Image.fromarray(img).save(path)
    return path


_PORTS: set[int] = set()


def free_port() -> int:
    """A currently free TCP port, never the same one twice in this session."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = int(s.getsockname()[1])
        if port not in _PORTS:
            _PORTS.add(port)
            return port


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    save_file: Path
    record_dir: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def records(self) -> list[dict[str, object]]:
        return [json.loads(p.read_text()) for p in sorted(self.record_dir.glob("*.json"))]


def upstream_args(image: Path, audio: str | Path, save_file: Path | None, *,
                  infer_frames: int = 24, num_clip: int = 10000, size: str = "384*256",
                  sample_steps: int = 4, lora: str | None = "Quark-Vision/Live-Avatar"
                  ) -> list[str]:
    """The single-GPU script's flags, small sizes, and avatarcli's --save_file."""
    args = [
        "--ulysses_size", "1", "--task", "s2v-14B", "--size", size, "--base_seed", "420",
        "--training_config", "liveavatar/configs/s2v_causal_sft.yaml",
        "--offload_model", "True", "--convert_model_dtype", "--prompt", "A person talking.",
        "--image", str(image), "--audio", str(audio), "--infer_frames", str(infer_frames),
        "--sample_steps", str(sample_steps), "--sample_guide_scale", "0",
        "--num_clip", str(num_clip), "--num_gpus_dit", "1", "--sample_solver", "euler",
        "--single_gpu", "--ckpt_dir", "ckpt/Wan2.2-S2V-14B/", "--fp8",
    ]
    if lora is not None:
        args += ["--load_lora", "--lora_path_dmd", lora]
    if save_file is not None:
        args += ["--save_file", str(save_file)]
    return args


def launch(work: Path, name: str, args: list[str], *, env: dict[str, str] | None = None,
           nproc: int = 1, port: int | None = None, cwd: Path = STANDIN,
           script: str = SCRIPT) -> Run:
    record_dir = work / f"{name}.records"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LIVEAVATAR_STANDIN_")}
    full_env = {**inherited, "LIVEAVATAR_STANDIN_RECORD": str(record_dir),
                "ENABLE_COMPILE": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [str(TORCHRUN), f"--nproc_per_node={nproc}",
           f"--master_port={port if port is not None else free_port()}", script, *args]
    save = Path(args[args.index("--save_file") + 1]) if "--save_file" in args else Path()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=180, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0, save,
               record_dir)


# ----------------------------------------------------------------------------- scenarios


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    work = tmp_path_factory.mktemp("standin")
    wide = make_image(work / "wide.png", 384, 256)
    tall = make_image(work / "tall.png", 240, 400)
    speech3 = make_wav(work / "speech3.wav", 3.0)
    speech2 = make_wav(work / "speech2.wav", 2.0)
    out = work / "out"
    out.mkdir()

    def ok_args(name: str, **kw: object) -> list[str]:
        return upstream_args(wide, speech3, out / f"{name}.mp4", num_clip=3, **kw)  # type: ignore[arg-type]

    def mode(name: str, **env: str) -> Callable[[], Run]:
        return lambda: launch(work, name, ok_args(name),
                              env={"LIVEAVATAR_STANDIN_MODE": name, **env})

    def oom_until() -> Run:
        counter = work / "launches.txt"
        env = {"LIVEAVATAR_STANDIN_OOM_UNTIL": "1", "LIVEAVATAR_STANDIN_COUNTER": str(counter)}
        first = launch(work, "oom_until_1", ok_args("oom_until_1"), env=env)
        second = launch(work, "oom_until_2", ok_args("oom_until_2"), env=env)
        second.extra.update(first=first, counter=counter.read_text().strip())
        return second

    def port_busy() -> Run:
        with socket.socket() as s:
            s.bind(("", 0))
            s.listen()
            return launch(work, "port_busy", ok_args("port_busy"), port=s.getsockname()[1])

    def plus_folder() -> Run:  # one file, but its folder's name holds '+'
        folder = work / "talk+music"
        folder.mkdir(exist_ok=True)
        wav = make_wav(folder / "speech.wav", 2.0)
        return launch(work, "plus_folder", upstream_args(wide, wav, out / "plus_folder.mp4"))

    def exif_rotated() -> Run:  # stored 400x240 (landscape), EXIF 6: shown as 240x400
        img = Image.open(tall).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        path = work / "rotated.jpg"
        img.save(path, exif=exif)
        return launch(work, "exif", upstream_args(path, speech2, out / "exif.mp4", num_clip=1))

    def tpp(name: str, steps: int) -> Callable[[], Run]:  # upstream's 5-process layout
        def go() -> Run:
            args = upstream_args(wide, speech2, out / f"{name}.mp4", num_clip=1,
                                 sample_steps=steps)
            args[args.index("--single_gpu")] = "--enable_vae_parallel"
            args[args.index("--num_gpus_dit") + 1] = "4"
            args[args.index("--offload_model") + 1] = "False"
            return launch(work, name, args, nproc=5,
                          env={"LIVEAVATAR_STANDIN_NCCL_TIMEOUT": "2"})
        return go

    def offload_false() -> Run:
        args = ok_args("offload_false")
        args[args.index("--offload_model") + 1] = "False"
        return launch(work, "offload_false", args)

    def wrong_cwd() -> Run:
        return launch(work, "wrong_cwd", ok_args("wrong_cwd"), cwd=work,
                      script=str(STANDIN / SCRIPT))

    scenarios: dict[str, Callable[[], Run]] = {
        # 3 clips x 24 frames - 3 = 69 frames (2.76 s), shorter than the 3 s of audio.
        "success": lambda: launch(work, "success", ok_args("success"),
                                  env={"CUDA_VISIBLE_DEVICES": "3"}),
        # All clips the audio allows: 2 s -> 5 clips of 12 = 57 frames (2.28 s) > 2 s audio.
        "trimmed": lambda: launch(work, "trimmed", upstream_args(
            tall, speech2, out / "trimmed.mp4", infer_frames=12)),
        "oom": mode("oom"),
        "crash": mode("crash"),
        "nofile": mode("nofile"),
        "short": mode("short"),
        "noaudio": mode("noaudio"),
        "oom_until": oom_until,
        "plus_audio": lambda: launch(work, "plus_audio", upstream_args(
            wide, f"{speech3}+{speech2}", out / "plus_audio.mp4")),
        "plus_folder": plus_folder,
        "exif": exif_rotated,
        "tpp4": tpp("tpp4", 4),
        "tpp2": tpp("tpp2", 2),
        "offload_false": offload_false,
        "steps5": lambda: launch(work, "steps5", ok_args("steps5", sample_steps=5)),
        "world2": lambda: launch(work, "world2", ok_args("world2"), nproc=2),
        "port_busy": port_busy,
        "wrong_cwd": wrong_cwd,
        "no_gpu": lambda: launch(work, "no_gpu", ok_args("no_gpu"),
                                 env={"CUDA_VISIBLE_DEVICES": ""}),
        "no_save_file": lambda: launch(work, "no_save_file", upstream_args(
            wide, speech3, None, num_clip=1, lora=None)),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(fn) for name, fn in scenarios.items()}
        return {name: f.result() for name, f in futures.items()}


# ----------------------------------------------------------------------------- tests


def test_success_writes_expected_frames_with_audio(runs: dict[str, Run]) -> None:
    r = runs["success"]
    assert r.rc == 0, r.output[-3000:]
    assert r.save_file.is_file()
    assert count_frames(r.save_file) == 3 * 24 - 3
    info = streams(r.save_file)
    assert "Video: h264" in info and "yuv420p" in info and "25 fps" in info
    assert "Audio: aac" in info
    assert video_size(r.save_file) == (384, 256)  # 384x256 image fits the area exactly
    assert "Saving generated video to" in r.stdout


def test_success_records_the_launch(runs: dict[str, Run]) -> None:
    r = runs["success"]
    (rec,) = r.records()
    assert rec["outcome"] == "ok" and rec["mode"] == "success"
    assert rec["cwd"] == str(STANDIN)
    argv = rec["argv"]
    assert isinstance(argv, list) and argv[0] == SCRIPT and "--save_file" in argv
    env = rec["env"]
    assert isinstance(env, dict)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["WORLD_SIZE"] == "1"
    assert env["ENABLE_COMPILE"] == "false" and env["MASTER_PORT"]
    assert isinstance(rec["start"], float) and isinstance(rec["end"], float)
    assert rec["start"] <= rec["end"]
    assert rec["clips"] == 3 and rec["frames_generated"] == 69
    assert rec["lora_source"] == "hub"  # Quark-Vision/Live-Avatar is a model-hub name


def test_shortest_mux_trims_video_to_the_audio(runs: dict[str, Run]) -> None:
    """Without a --num_clip limit the model makes more video than audio; upstream's
    `-shortest` mux then cuts the file near the audio's end (not frame-exact)."""
    r = runs["trimmed"]
    assert r.rc == 0, r.output[-3000:]
    (rec,) = r.records()
    assert rec["clips"] == 5 and rec["frames_generated"] == 5 * 12 - 3
    frames = count_frames(r.save_file)
    assert 2.0 * FPS - 6 <= frames < 57
    # 240x400 portrait into the 384*256 area: orientation follows the image, sides are
    # multiples of 64 and the area is not exceeded.
    assert video_size(r.save_file) == (256, 384)


def test_oom_mode(runs: dict[str, Run]) -> None:
    r = runs["oom"]
    assert r.rc == 1
    assert OOM_TEXT in r.stderr
    assert "GPU 0 has a total capacity of 23.55 GiB of which 1.02 GiB is free" in r.stderr
    assert "ChildFailedError" in r.stderr  # torchrun's report of a failed worker
    assert not r.save_file.exists()
    assert r.records()[0]["outcome"].startswith("torch.OutOfMemoryError")  # type: ignore[union-attr]


def test_crash_mode(runs: dict[str, Run]) -> None:
    r = runs["crash"]
    assert r.rc == 1
    assert "Traceback" in r.stderr and "Error(s) in loading state_dict" in r.stderr
    assert "out of memory" not in r.output
    assert not r.save_file.exists()


def test_nofile_mode_exits_zero_without_a_file(runs: dict[str, Run]) -> None:
    r = runs["nofile"]
    assert r.rc == 0, r.output[-3000:]
    assert "saved to" in r.stdout
    assert not r.save_file.exists()


def test_short_mode_writes_fewer_frames(runs: dict[str, Run]) -> None:
    r = runs["short"]
    assert r.rc == 0, r.output[-3000:]
    assert 0 < count_frames(r.save_file) < 69


def test_noaudio_mode_leaves_a_silent_video(runs: dict[str, Run]) -> None:
    r = runs["noaudio"]
    assert r.rc == 0, r.output[-3000:]
    assert "merge_video_audio failed" in r.stdout
    assert count_frames(r.save_file) == 69
    assert "Audio:" not in streams(r.save_file)


def test_oom_until_counts_launches(runs: dict[str, Run]) -> None:
    second = runs["oom_until"]
    first = second.extra["first"]
    assert isinstance(first, Run)
    assert first.rc == 1 and OOM_TEXT in first.stderr and not first.save_file.exists()
    assert second.rc == 0, second.output[-3000:]
    assert count_frames(second.save_file) == 69
    assert second.extra["counter"] == "2"


def test_plus_in_audio_switches_to_multi_speaker_and_fails(runs: dict[str, Run]) -> None:
    # pipeline:768-774: split on '+', one speaker per piece, then SAM2 routing.
    r = runs["plus_audio"]
    assert r.rc != 0
    assert "multi-speaker" in r.output
    assert not r.save_file.exists()


def test_plus_in_a_folder_name_fails_after_the_model_loaded(runs: dict[str, Run]) -> None:
    r = runs["plus_folder"]
    assert r.rc != 0 and not r.save_file.exists()
    assert "No such file or directory" in r.output  # '.../talk' is not a file
    # late: the pipeline was built and the LoRA loaded before the audio was read
    assert r.output.index("Creating WanModel") < r.output.index("No such file or directory")


def test_image_is_read_without_exif_rotation(runs: dict[str, Run]) -> None:
    # Image.open(p).convert('RGB') (pipeline:757): the stored 400x240 pixels, not the upright
    # 240x400 picture, decide the frame size: landscape 384x256 (WxH), not portrait.
    r = runs["exif"]
    assert r.rc == 0, r.output
    rec = r.records()[0]
    assert (rec["width"], rec["height"]) == (384, 256)


def test_five_processes_with_four_steps_save_on_rank_4(runs: dict[str, Run]) -> None:
    r = runs["tpp4"]
    assert r.rc == 0, r.output
    assert r.save_file.is_file() and count_frames(r.save_file) == 24 - 3
    rec = r.records()[0]
    assert rec["save_rank"] == 4 and rec["world_size"] == 5


def test_five_processes_with_fewer_steps_hang_until_nccl_times_out(runs: dict[str, Run]) -> None:
    r = runs["tpp2"]
    assert r.rc != 0 and not r.save_file.exists()
    assert "Watchdog caught collective operation timeout" in r.output


def test_one_gpu_without_offload_fails_at_decode(runs: dict[str, Run]) -> None:
    r = runs["offload_false"]
    assert r.rc != 0 and not r.save_file.exists()
    assert "weight type (CPUBFloat16Type)" in r.output


def test_more_than_four_sample_steps_fails(runs: dict[str, Run]) -> None:
    r = runs["steps5"]
    assert r.rc != 0
    assert "KeyError: '5'" in r.stderr
    assert not r.save_file.exists()


def test_two_processes_are_not_a_supported_world_size(runs: dict[str, Run]) -> None:
    r = runs["world2"]
    assert r.rc != 0
    assert "At least 5 GPUs are supported for distributed inference." in r.stderr
    assert not r.save_file.exists()


def test_busy_master_port_fails(runs: dict[str, Run]) -> None:
    r = runs["port_busy"]
    assert r.rc != 0
    assert "EADDRINUSE" in r.stderr or "address already in use" in r.stderr
    assert not r.save_file.exists()


def test_wrong_working_directory_fails(runs: dict[str, Run]) -> None:
    r = runs["wrong_cwd"]
    assert r.rc != 0
    assert "FileNotFoundError" in r.stderr and "s2v_causal_sft.yaml" in r.stderr


def test_empty_cuda_visible_devices_fails(runs: dict[str, Run]) -> None:
    r = runs["no_gpu"]
    assert r.rc != 0
    assert "No CUDA GPUs are available" in r.stderr


def test_missing_save_file_without_lora_path_fails(runs: dict[str, Run]) -> None:
    r = runs["no_save_file"]
    assert r.rc != 0
    assert "AttributeError" in r.stderr and "split" in r.stderr
