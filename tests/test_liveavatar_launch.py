"""LiveAvatar launches that are right on a real GPU (read from upstream at 9c2c38d):
golden command lines per built-in preset, upstream's frame-size rule, the audio shift that puts
lips in sync, '+'-free paths, upright portraits, free ports, and the rules checked before a
launch. The end-to-end test measures the lip/sound lag of a finished video made through the
stand-in checkout, whose frames carry the loudness they were generated from."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from avatarcli import gpus, presets
from avatarcli.engines.base import JobInputs, PartTask
from avatarcli.engines.liveavatar.engine import LiveAvatarEngine, frame_size, plus_free
from avatarcli.media import streams as m
from avatarcli.media.ffmpeg_bin import ffmpeg_exe
from avatarcli.plan import Batch

STANDIN = Path(__file__).resolve().parent / "liveavatar_standin"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
MOUTH = np.array([120, 20, 40])  # the stand-in's loudness box colour


# ---- upstream's frame-size rule ------------------------------------------------------------

@pytest.mark.parametrize(("w", "h", "area", "expected"), [
    # the corrected contract's examples, given as (W, H)
    (768, 1024, 704 * 384, (448, 576)),
    (1920, 1080, 704 * 384, (704, 384)),
    (400, 600, 720 * 400, (448, 640)),  # 2:3 at 720*400: ours used to be 384x640
    (360, 640, 384 * 256, (256, 384)),  # 9:16: an area-fitting rule would give 192x384
    (300, 300, 704 * 384, (320, 320)),  # smaller than the area: padded up, never enlarged
])
def test_frame_size_follows_upstream(w: int, h: int, area: int,
                                     expected: tuple[int, int]) -> None:
    assert frame_size(w, h, area) == expected
    fw, fh = expected
    assert fw % 64 == 0 and fh % 64 == 0 and fw * fh <= area


def test_frame_size_of_a_prepared_portrait_is_a_fixed_point() -> None:
    # We hand upstream the portrait already at the planned size: it must render that size.
    for key in ("704*384", "720*400", "384*256", "1280*720", "480*832"):
        a, b = presets.parse_size(key)
        for w, h in ((1080, 1920), (1920, 1080), (1000, 1000), (600, 400), (3024, 4032)):
            fw, fh = frame_size(w, h, a * b)
            assert frame_size(fw, fh, a * b) == (fw, fh)


# ---- golden command lines ------------------------------------------------------------------

def _task(tmp_path: Path, name: str, *, frames: int = 150, start: int = 0,
          overrides: dict[str, Any] | None = None) -> tuple[LiveAvatarEngine, PartTask]:
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"x")
    base = {"liveavatar": {"repo": str(STANDIN), "torchrun": "/opt/la/bin/torchrun",
                           "lora_path": str(lora)}}
    preset = presets.resolve(name, presets._merge(base, overrides or {})).preset
    job = tmp_path / "talk.mp4.parts"
    inputs = JobInputs(audio=tmp_path / "talk.wav", image=tmp_path / "face.jpg", job_dir=job,
                       portrait=job / "portrait.png", features=job / "features.npy",
                       width=384, height=704, fps=25)
    batch = Batch(index=2, frame_start=start, frame_end=start + frames, clips=4)
    task = PartTask(inputs=inputs, batch=batch, out=job / "parts" / ".part.tmp.mp4",
                    engine_state={"prompt": "A teacher."}, env={"CUDA_VISIBLE_DEVICES": "1"})
    return LiveAvatarEngine(preset), task


def _golden(tmp_path: Path, *, size: str, frames: str, steps: str, offload: str, clips: str,
            single: bool, extra: list[str]) -> list[str]:
    job = tmp_path / "talk.mp4.parts"
    return [
        "/opt/la/bin/torchrun", f"--nproc_per_node={1 if single else 5}", "--master_port=29555",
        "minimal_inference/s2v_streaming_interact.py",
        "--ulysses_size", "1", "--task", "s2v-14B", "--size", size, "--base_seed", "420",
        "--training_config", "liveavatar/configs/s2v_causal_sft.yaml",
        "--offload_model", offload, "--convert_model_dtype", "--prompt", "A teacher.",
        "--image", str(job / "portrait.png"), "--audio", str(job / "audio" / "batch-0002.wav"),
        "--infer_frames", frames, "--load_lora", "--lora_path_dmd",
        str(tmp_path / "lora.safetensors"), "--sample_steps", steps,
        "--sample_guide_scale", "0", "--num_clip", clips,
        "--num_gpus_dit", "1" if single else "4", "--sample_solver", "euler",
        "--single_gpu" if single else "--enable_vae_parallel",
        "--ckpt_dir", "ckpt/Wan2.2-S2V-14B/", *extra,
        "--save_file", str(job / "raw" / "batch-0002.mp4"),
    ]


@pytest.mark.parametrize(("name", "golden"), [
    # infinite_inference_single_gpu.sh
    ("liveavatar-80gb", dict(size="704*384", frames="48", steps="4", offload="True", clips="4",
                             single=True, extra=[])),
    ("liveavatar-48gb-fp8", dict(size="704*384", frames="48", steps="4", offload="True",
                                 clips="4", single=True, extra=["--fp8", "--offload_kv_cache"])),
    # infinite_inference_multi_gpu.sh
    ("liveavatar-5x80gb", dict(size="720*400", frames="48", steps="4", offload="False",
                               clips="4", single=False, extra=[])),
    # its memory levers are the resident worker's: the script launch's flags do not show them
    ("liveavatar-24gb", dict(size="384*256", frames="24", steps="4", offload="True", clips="7",
                             single=True, extra=["--enable_online_decode"])),
])
def test_golden_command_line_per_builtin_preset(tmp_path: Path, name: str,
                                                golden: dict[str, Any]) -> None:
    engine, task = _task(tmp_path, name)
    cmd, env = engine.command(task, port="29555")
    assert cmd == _golden(tmp_path, **golden)
    assert env == {"ENABLE_COMPILE": "true", "NCCL_DEBUG": "WARN", "CUDA_VISIBLE_DEVICES": "1"}


def test_each_launch_gets_a_free_port(tmp_path: Path) -> None:
    engine, task = _task(tmp_path, "liveavatar-80gb")
    assert all("MASTER_PORT" not in slot for slot in engine.slots(2, "0,1"))
    for _ in range(3):
        cmd, _env = engine.command(task)
        port = int(next(a for a in cmd if a.startswith("--master_port=")).split("=")[1])
        assert 1024 <= port <= 65535
        with socket.socket() as s:  # free when asked: binding it must work
            s.bind(("", port))
    # a port given by the slot (the Ray executor picks one free on its node) wins
    ray_task = PartTask(task.inputs, task.batch, task.out, task.engine_state,
                        {"MASTER_PORT": "31234"})
    assert "--master_port=31234" in engine.command(ray_task)[0]


@pytest.mark.parametrize(("start", "shift", "expected_start"), [
    (0, 3, -3 / 25), (100, 3, 97 / 25), (100, 0, 4.0), (100, -2, 102 / 25)])
def test_audio_slice_starts_shift_frames_early(tmp_path: Path, start: int, shift: int,
                                               expected_start: float) -> None:
    engine, task = _task(tmp_path, "liveavatar-80gb", frames=150, start=start,
                         overrides={"liveavatar": {"audio_shift_frames": shift}})
    start_s, duration_s = engine.slice_window(task)
    assert start_s == pytest.approx(expected_start)
    # exactly the clips the launch renders: ceil((150 + 3) / 48) = 4 clips of 48 frames
    assert duration_s == pytest.approx(4 * 48 / 25)


def test_plus_free_links_the_job_folder(tmp_path: Path) -> None:
    job = tmp_path / "talk+music.mp4.parts"
    job.mkdir()
    (job / "a.wav").write_bytes(b"x")
    with plus_free(job, "0001") as alias:
        assert "+" not in str(alias) and (alias / "a.wav").read_bytes() == b"x"
    assert not alias.exists() and not alias.is_symlink()  # removed after the launch
    plain = tmp_path / "plain"
    with plus_free(plain, "0001") as same:
        assert same == plain


# ---- rules checked before a launch ---------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"sample_steps": 3, "liveavatar": {"gpus_per_run": 5}}, "must be exactly 4 with 5 GPUs"),
    ({"offload": False}, "offload must be true for LiveAvatar on one GPU"),
])
def test_settings_upstream_cannot_run_are_refused(overrides: dict[str, Any],
                                                  message: str) -> None:
    from avatarcli.errors import InputError

    with pytest.raises(InputError, match=message):
        presets.resolve("liveavatar-80gb", overrides)


def test_retry_rungs_that_cannot_lower_the_peak_warn(tmp_path: Path) -> None:
    from avatarcli.engines.liveavatar import memory

    for name in ("liveavatar-80gb", "liveavatar-48gb-fp8", "liveavatar-5x80gb",
                 "liveavatar-24gb"):
        effects = memory.rung_effects(presets.resolve(name).preset)
        assert effects and all(after < before for _, before, after in effects), name
    useless = presets.resolve("liveavatar-5x80gb", {"oom_retry": [
        {"liveavatar.offload_kv_cache": True}, {"online_decode": True}, {"infer_frames": 24}]})
    warned = memory.rung_warnings(useless.preset)
    assert len(warned) == 2 and "rung 1" in warned[0] and "rung 2" in warned[1]


def test_fp8_on_a_gpu_below_8_9_is_refused_before_launch(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = _task(tmp_path, "liveavatar-48gb-fp8")
    card = gpus.GpuFact("0", "NVIDIA A100-SXM4-80GB", 80.0, 79.0, (8, 0), "nvml")
    monkeypatch.setattr(gpus, "facts", lambda: [card])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    problems = engine._check_fp8()
    assert len(problems) == 1 and "compute capability 8.0" in problems[0]
    monkeypatch.setattr(gpus, "facts", lambda: [gpus.GpuFact("0", "H100", 80.0, 79.0, (9, 0),
                                                             "nvml")])
    assert engine._check_fp8() == []


def test_host_ram_is_checked_before_launch(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    engine, task = _task(tmp_path, "liveavatar-48gb-fp8")
    monkeypatch.setenv("AVATARCLI_HOST_MEM_GB", "64")
    problems = engine._check_host_memory(task.inputs)
    assert len(problems) == 1 and "kv_cache 47" in problems[0] and "64 GB" in problems[0]
    monkeypatch.setenv("AVATARCLI_HOST_MEM_GB", "96")
    assert engine._check_host_memory(task.inputs) == []
    engine, task = _task(tmp_path, "liveavatar-80gb")  # KV caches on the GPU: ~20 GB of RAM
    monkeypatch.setenv("AVATARCLI_HOST_MEM_GB", "24")
    assert engine._check_host_memory(task.inputs) == []


def test_checkpoint_folder_contents_are_checked(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(STANDIN / "ckpt" / "Wan2.2-S2V-14B", ckpt)
    engine, _ = _task(tmp_path, "liveavatar-80gb",
                      overrides={"liveavatar": {"ckpt_dir": str(ckpt)}})
    assert engine._check_checkpoints() == []
    (ckpt / "Wan2.1_VAE.pth").unlink()
    shutil.rmtree(ckpt / "wav2vec2-large-xlsr-53-english")
    [problem] = engine._check_checkpoints()
    assert "missing Wan2.1_VAE.pth, wav2vec2-large-xlsr-53-english/" in problem


def test_tilde_in_ckpt_dir_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    engine, task = _task(tmp_path, "liveavatar-80gb",
                         overrides={"liveavatar": {"ckpt_dir": "~/ckpt/S2V",
                                                   "training_config": "~/cfg.yaml"}})
    cmd, _ = engine.command(task, port="1")
    assert cmd[cmd.index("--ckpt_dir") + 1] == str(tmp_path / "ckpt" / "S2V")
    assert cmd[cmd.index("--training_config") + 1] == str(tmp_path / "cfg.yaml")


# ---- end to end: lips in sync, upright, '+' in every folder --------------------------------

def _rotated_portrait(path: Path) -> Path:
    """A 9:16 portrait (360x640 as shown) stored sideways with EXIF orientation 6, as phones
    write them: blue top half, green bottom half when shown upright."""
    upright = np.zeros((640, 360, 3), np.uint8)
    upright[:320] = (50, 70, 230)
    upright[320:] = (60, 200, 90)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 640x360 on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to show
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, exif=exif, quality=95)
    return path


def _frames(path: Path, width: int, height: int) -> np.ndarray:
    raw = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-f",
                          "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True,
                         check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def _loudness_per_frame(wav: Path, fps: int = 25) -> np.ndarray:
    with wave.open(str(wav)) as w:
        rate, n = w.getframerate(), w.getnframes()
        pcm = np.frombuffer(w.readframes(n), "<i2").astype(np.float64)
        pcm = pcm.reshape(-1, w.getnchannels()).mean(axis=1)
    hop = rate / fps
    count = int(np.ceil(len(pcm) / hop))
    return np.array([np.sqrt(np.mean(pcm[int(i * hop):int((i + 1) * hop)] ** 2) + 1e-12)
                     for i in range(count)])


def best_lag(mouth: np.ndarray, loud: np.ndarray, span: int = 8) -> int:
    """The lag L maximising corr(mouth[n], loud[n + L]): 0 when frame n shows sound n."""
    n = len(mouth)
    scores = {}
    for lag in range(-span, span + 1):
        idx = np.arange(max(0, -lag), min(n, len(loud) - lag))
        scores[lag] = np.corrcoef(mouth[idx], loud[idx + lag])[0, 1]
    return max(scores, key=lambda k: scores[k])


@pytest.mark.slow
@pytest.mark.parametrize("max_batches", [1, 20], ids=["script-launch", "resident-worker"])
def test_finished_video_is_in_sync_upright_and_the_planned_size(media: dict[str, Path],
                                                                tmp_path: Path,
                                                                max_batches: int) -> None:
    image = _rotated_portrait(tmp_path / "in+put" / "face+1.jpg")
    audio = tmp_path / "in+put" / "talk+music.wav"
    shutil.copy(media["speech6"], audio)
    out = tmp_path / "out+dir" / "talk+music.mp4"
    out.parent.mkdir()
    lora = tmp_path / "lo+ra" / "liveavatar.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"stand-in weights")
    record = tmp_path / "record"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AVATARCLI_HOST_MEM_GB": "256",
           "LIVEAVATAR_STANDIN_RECORD": str(record)}
    run = subprocess.run(
        [sys.executable, "-m", "avatarcli", "gen", str(audio), str(image), "-o", str(out),
         "-p", "liveavatar-24gb", "--set", f"liveavatar.repo={STANDIN}",
         "--set", f"liveavatar.torchrun={TORCHRUN}", "--set", f"liveavatar.lora_path={lora}",
         "--set", "liveavatar.env={ENABLE_COMPILE: false}", "--set", "cooldown_s=0",
         "--set", "clips_per_batch=2", "--gpus", "0,1", "--json",
         "--set", f"worker.max_batches={max_batches}",
         *([] if max_batches > 1 else ["--set", "liveavatar.resident_blocks=40", "--set", "liveavatar.weight_storage=bf16"])],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["batches"] == 3 and summary["frames"] == 150

    # upstream's size rule for the upright 9:16 portrait, rendered as is (no rescale)
    assert (summary["width"], summary["height"]) == (256, 384)
    launches = [json.loads(p.read_text()) for p in sorted(record.glob("*.json"))]
    assert len(launches) == 3
    for r in launches:
        assert (r["width"], r["height"]) == (256, 384), r
        for flag in ("--audio", "--image", "--save_file"):
            if flag in r["argv"]:  # the resident API gets no --save_file
                assert "+" not in r["argv"][r["argv"].index(flag) + 1]

    frames = _frames(out, 256, 384)
    assert len(frames) == 150
    # upright: blue above, green below (a sideways portrait puts them left and right)
    mid = frames[len(frames) // 2].astype(int)
    assert np.abs(mid[110, 128] - (50, 70, 230)).sum() < 60
    assert np.abs(mid[330, 40] - (60, 200, 90)).sum() < 60
    # lips in sync: the stand-in's box grows with the loudness each frame was generated from
    column = frames[:, :, 128].astype(int)  # (frames, rows, rgb)
    mouth = (np.abs(column - MOUTH).sum(axis=2) < 60).sum(axis=1).astype(float)
    assert mouth.std() > 0
    loud = _loudness_per_frame(audio)
    assert best_lag(mouth, loud) == 0
    assert abs(m.audio_seconds(out) - 6.0) <= 0.04


def test_plan_gives_a_host_ram_verdict() -> None:
    from typer.testing import CliRunner

    from avatarcli.cli import app
    from avatarcli.engines.liveavatar import memory

    est = memory.host_estimate(presets.resolve("liveavatar-48gb-fp8").preset, total_gb=None)
    # four per-step caches of 12672 tokens + their own 2800-token cond caches, bf16, 40 layers
    per_cache = 40 * 2 * (12672 + 2800) * 40 * 128 * 2 / 2**30
    assert est.components["kv_cache"] == pytest.approx(4 * per_cache, rel=1e-6)
    assert 46.5 < est.components["kv_cache"] < 48  # the contract's "about 47 GiB"
    runner = CliRunner()
    short = runner.invoke(app, ["plan", "-p", "liveavatar-48gb-fp8", "--gpu-mem", "48",
                                "--host-mem", "64"])
    assert short.exit_code == 1 and "host RAM: peak 67" in short.output
    assert "does NOT fit" in short.output.split("host RAM")[1]
    enough = runner.invoke(app, ["plan", "-p", "liveavatar-48gb-fp8", "--gpu-mem", "48",
                                 "--host-mem", "128", "--json"])
    assert enough.exit_code == 0
    data = json.loads(enough.output)
    assert data["host_fits"] and data["gpu_fits"] and data["fits"]


def test_levers_without_a_resident_worker_are_refused(tmp_path: Path) -> None:
    # The script launch would ignore them and run out of memory on the card they were for.
    engine, _ = _task(tmp_path, "liveavatar-24gb", overrides={"worker": {"max_batches": 1}})
    problems, _ = engine.check_setup()
    assert any("act only in a resident worker" in p for p in problems)
    resident, _ = _task(tmp_path, "liveavatar-24gb")
    assert not any("resident worker" in p for p in resident.check_setup()[0])
