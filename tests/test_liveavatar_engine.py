"""`engine: liveavatar` end to end through `avatar gen`, launched by the real torchrun path
into a stand-in checkout (tests/liveavatar_standin) that honours upstream's command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from avatarcli.media import streams as m

pytestmark = pytest.mark.slow
STANDIN = Path(__file__).resolve().parent / "liveavatar_standin"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def gen(media: dict[str, Path], out: Path, lora: Path, *extra: str, mode: str = "success",
        record: Path | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    run_env = {**os.environ, "LIVEAVATAR_STANDIN_MODE": mode, "OMP_NUM_THREADS": "1",
               # configuration through the environment, as a cron job would do it
               "AVATARCLI_LIVEAVATAR_REPO": str(STANDIN),
               "AVATARCLI_LIVEAVATAR_TORCHRUN": TORCHRUN,
               "AVATARCLI_LIVEAVATAR_LORA": str(lora),
               # the stand-in plays a GPU server; liveavatar-24gb loads its DiT in ~48 GB RAM
               "AVATARCLI_HOST_MEM_GB": "256", **(env or {})}
    if record is not None:
        run_env["LIVEAVATAR_STANDIN_RECORD"] = str(record)
    return subprocess.run(
        [sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]), str(media["portrait"]),
         "-o", str(out), "-p", "liveavatar-24gb", "--set", "liveavatar.env={ENABLE_COMPILE: false}",
         "--set", "cooldown_s=0", "--set", "worker.max_batches=1",
         # the script launch: upstream as it is, no resident worker levers
         "--set", "liveavatar.resident_blocks=40", "--set", "liveavatar.weight_storage=bf16", "--json", *extra],
        capture_output=True, text=True, timeout=300, env=run_env, stdin=subprocess.DEVNULL)


def launches(record: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(record.glob("*.json"))]


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_batches_on_two_gpus_run_concurrently_and_join(media: dict[str, Path], tmp_path: Path,
                                                       lora: Path) -> None:
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "talk.mp4"
    run = gen(media, out, lora, "--set", "clips_per_batch=2", "--gpus", "0,1", record=record,
              env={"LIVEAVATAR_STANDIN_DELAY": "2"})
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["batches"] == 3 and summary["frames"] == 150
    # The plan's size (multiples of 64 in the 384*256 area), the plan's frames, 25 fps, AAC.
    assert m.video_frames(out) == 150
    assert abs(m.audio_seconds(out) - 6.0) <= 0.04
    video = m.probe(out).first("video")
    assert video is not None and (video.width, video.height) == (256, 256)  # square portrait

    runs = launches(record)
    assert len(runs) == 3
    for r in runs:
        argv = r["argv"]
        assert r["cwd"] == str(STANDIN)
        assert "+" not in arg(argv, "--audio")
        assert arg(argv, "--save_file").startswith(str(tmp_path / "talk.mp4.parts"))
        assert arg(argv, "--lora_path_dmd") == str(lora)
        assert arg(argv, "--size") == "384*256" and arg(argv, "--sample_steps") == "4"
        assert "--single_gpu" in argv  # the preset's memory levers are the resident worker's:
        assert "--fp8" not in argv and "--offload_kv_cache" not in argv  # no script flags
        assert arg(argv, "--offload_model") == "True"
        assert r["env"]["ENABLE_COMPILE"] == "false"
    # Enough clips of 24 frames for the batch although clip 0 loses 3 frames, no more; each
    # batch after the first also renders the 8-frame seam overlap before its boundary.
    frames = {b["index"]: b["frame_end"] - b["frame_start"] + (8 if b["index"] else 0)
              for b in summary["plan"]}
    for r in runs:
        index = int(Path(arg(r["argv"], "--audio")).stem.split("-")[1])
        assert int(arg(r["argv"], "--num_clip")) == -(-(frames[index] + 3) // 24)
    devices = {r["env"]["CUDA_VISIBLE_DEVICES"] for r in runs}
    ports = {r["env"]["MASTER_PORT"] for r in runs[:2]}
    assert devices == {"0", "1"} and len(ports) == 2
    first, second = sorted(runs, key=lambda r: r["start"])[:2]
    assert second["start"] < first["end"], "the two GPUs did not work at the same time"


@pytest.mark.parametrize(("mode", "code", "failure", "message"), [
    ("oom", 4, "oom", "CUDA out of memory"),
    ("crash", 3, "crash", "LiveAvatar exited with 1"),
    ("nofile", 3, "crash", "wrote no video"),
    ("short", 3, "crash", "expected at least"),
])
def test_upstream_failures(media: dict[str, Path], tmp_path: Path, lora: Path, mode: str,
                           code: int, failure: str, message: str) -> None:
    out = tmp_path / "t.mp4"
    run = gen(media, out, lora, mode=mode)
    assert run.returncode == code, run.stderr
    assert message in run.stderr and "batch-0000.log" in run.stderr
    part = json.loads((tmp_path / "t.mp4.parts" / "manifest.json").read_text())["parts"][0]
    assert (part["state"], part["failure"]) == ("failed", failure)
    assert not out.exists()


def test_dry_run_prints_commands_ready_to_paste(media: dict[str, Path], tmp_path: Path,
                                                lora: Path) -> None:
    run = gen(media, tmp_path / "t.mp4", lora, "--dry-run", "--gpus", "2,3",
              "--set", "clips_per_batch=2", "--prompt", "She's talking")
    assert run.returncode == 0, run.stderr
    commands = [b["command"] for b in json.loads(run.stdout)["plan"]]
    assert commands[0].startswith(f"cd {STANDIN} && ")
    assert "CUDA_VISIBLE_DEVICES=2 " in commands[0] and "CUDA_VISIBLE_DEVICES=3 " in commands[1]
    # a free rendezvous port per launch, never a fixed one two runs on a host would share
    assert all(re.search(r"--master_port=\d{4,5} ", c) for c in commands)
    assert "--prompt 'She'\"'\"'s talking'" in commands[0]
    assert not (tmp_path / "t.mp4.parts").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "liveavatar.repo=/nonexistent/LiveAvatar"], "not a LiveAvatar checkout"),
    (["--set", "size=512*512"], "one of LiveAvatar's area keys"),
    (["--set", "sample_steps=5"], "sample_steps must be within [1, 4]"),
    (["--set", "liveavatar.gpus_per_run=5", "--set", "sample_steps=4", "--gpus", "0,1"],
     "needs 5 GPUs per launch"),
    (["--set", "liveavatar.gpus_per_run=5", "--set", "sample_steps=2", "--gpus", "0,1,2,3,4"],
     "must be exactly 4 with 5"),
    (["--set", "offload=false"], "offload must be true for LiveAvatar on one GPU"),
    (["--set", "liveavatar.ckpt_dir=liveavatar/configs"], "not a Wan2.2-S2V-14B checkpoint"),
    (["--set", "liveavatar.torchrun=/nonexistent/torchrun"], "torchrun not found"),
])
def test_rules_are_checked_before_launch(media: dict[str, Path], tmp_path: Path, lora: Path,
                                         extra: list[str], message: str) -> None:
    record = tmp_path / "record"
    record.mkdir()
    run = gen(media, tmp_path / "t.mp4", lora, *extra, record=record)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr
    assert launches(record) == [] and not (tmp_path / "t.mp4.parts").exists()


def test_host_ram_short_of_the_estimate_is_refused(media: dict[str, Path], tmp_path: Path,
                                                   lora: Path) -> None:
    record = tmp_path / "record"
    record.mkdir()
    # KV caches in host memory: ~28 GB of RAM for this launch, on a 16 GB machine
    run = gen(media, tmp_path / "t.mp4", lora, "--set", "liveavatar.offload_kv_cache=true",
              record=record, env={"AVATARCLI_HOST_MEM_GB": "16"})
    assert run.returncode == 2 and "GB of host RAM" in run.stderr
    assert launches(record) == []


def test_lora_folder_is_refused(media: dict[str, Path], tmp_path: Path, lora: Path) -> None:
    run = gen(media, tmp_path / "t.mp4", lora.parent)
    assert run.returncode == 2 and "must name the file itself" in run.stderr


def test_infer_frames_not_multiple_of_12_warns(media: dict[str, Path], tmp_path: Path,
                                               lora: Path) -> None:
    run = gen(media, tmp_path / "t.mp4", lora, "--dry-run", "--set", "infer_frames=20")
    assert run.returncode == 0
    assert "not a multiple of 12" in run.stderr


def test_oom_is_retried_with_the_ladder_for_that_batch_only(media: dict[str, Path],
                                                           tmp_path: Path, lora: Path) -> None:
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "t.mp4"
    # liveavatar-24gb's ladder: rung 1 adds --t5_cpu, rung 2 also 12 frames per clip.
    run = gen(media, out, lora, record=record,
              env={"LIVEAVATAR_STANDIN_OOM_UNTIL": "2",
                   "LIVEAVATAR_STANDIN_COUNTER": str(tmp_path / "launches")})
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert [b["rung"] for b in summary["plan"]] == [2]
    assert "retrying it with rung 1" in run.stderr and "retrying it with rung 2" in run.stderr
    runs = sorted(launches(record), key=lambda r: r["start"])
    assert len(runs) == 3
    assert "--t5_cpu" not in runs[0]["argv"] and "--t5_cpu" in runs[1]["argv"]
    assert arg(runs[2]["argv"], "--infer_frames") == "12" and "--t5_cpu" in runs[2]["argv"]
    # Another clip length mid-video still gives the planned frames, size and sync.
    assert m.video_frames(out) == 150
    assert abs(m.audio_seconds(out) - 6.0) <= 0.04


def test_oom_after_the_last_rung_exits_4_with_the_memory_facts(media: dict[str, Path],
                                                               tmp_path: Path,
                                                               lora: Path) -> None:
    out = tmp_path / "t.mp4"
    run = gen(media, out, lora, env={"LIVEAVATAR_STANDIN_OOM_UNTIL": "99",
                                     "LIVEAVATAR_STANDIN_COUNTER": str(tmp_path / "launches")})
    assert run.returncode == 4, run.stderr
    assert "out of memory at rung 2 of 2" in run.stderr
    assert "Tried to allocate" in run.stderr  # what the GPU reported
    part = json.loads((tmp_path / "t.mp4.parts" / "manifest.json").read_text())["parts"][0]
    assert part["failure"] == "oom" and part["attempts"] == 3
