"""Resident model workers: LiveAvatar's pipeline loaded once for many batches (and rows),
through avatarcli's adapter driving the stand-in of upstream's Python API
(tests/liveavatar_standin/liveavatar/models/wan/causal_s2v_pipeline.py), recycled at the
memory watermark, after failures and at the end."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from avatarcli.engines.liveavatar import adapter as liveavatar_adapter
from avatarcli.media import streams as m

pytestmark = pytest.mark.slow
STANDIN = Path(__file__).resolve().parent / "liveavatar_standin"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ADAPTER = Path(liveavatar_adapter.__file__)


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "AVATARCLI_HOST_MEM_GB": "256",
            "LIVEAVATAR_STANDIN_LOADS": str(tmp_path / "loads"), **extra}


def base_args(lora: Path) -> list[str]:
    return ["-p", "liveavatar-24gb", "--set", f"liveavatar.repo={STANDIN}",
            "--set", f"liveavatar.torchrun={TORCHRUN}", "--set", f"liveavatar.lora_path={lora}",
            "--set", "liveavatar.env={ENABLE_COMPILE: false}", "--set", "cooldown_s=0"]


def gen(media: dict[str, Path], out: Path, lora: Path, tmp_path: Path, *extra: str,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]), str(media["portrait"]),
         "-o", str(out), *base_args(lora), "--json", *extra],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env=env_for(tmp_path, **(env or {})))


def loads(tmp_path: Path) -> int:
    path = tmp_path / "loads"
    return len(path.read_text().split()) if path.exists() else 0


def manifest(out: Path) -> dict:
    return json.loads((Path(f"{out}.parts") / "manifest.json").read_text())


def test_one_load_renders_every_batch_of_a_job(media: dict[str, Path], tmp_path: Path,
                                               lora: Path) -> None:
    out = tmp_path / "talk.mp4"
    run = gen(media, out, lora, tmp_path, "--set", "clips_per_batch=2", "--keep-parts")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["batches"] == 3 and loads(tmp_path) == 1
    [worker] = summary["workers"]
    assert worker["batches"] == 3 and worker["load_s"] > 0
    parts = manifest(out)["parts"]
    assert {p["worker"]["id"] for p in parts} == {1}
    # only the first batch paid for the load
    assert [("load_s" in p["worker"]) for p in parts] == [True, False, False]
    assert m.video_frames(out) == 150 and abs(m.audio_seconds(out) - 6.0) <= 0.04


def test_max_batches_1_is_a_fresh_launch_per_batch(media: dict[str, Path], tmp_path: Path,
                                                   lora: Path) -> None:
    record = tmp_path / "record"
    run = gen(media, tmp_path / "t.mp4", lora, tmp_path, "--set", "clips_per_batch=2",
              "--set", "worker.max_batches=1", "--set", "liveavatar.resident_blocks=40", "--set", "liveavatar.weight_storage=bf16",
              env={"LIVEAVATAR_STANDIN_RECORD": str(record)})
    assert run.returncode == 0, run.stderr
    assert loads(tmp_path) == 0 and len(list(record.glob("*.json"))) == 3  # the script, 3 times
    assert json.loads(run.stdout)["workers"] == []


def test_dry_run_says_which_batches_each_worker_takes(media: dict[str, Path], tmp_path: Path,
                                                      lora: Path) -> None:
    run = gen(media, tmp_path / "t.mp4", lora, tmp_path, "--dry-run", "--set",
              "clips_per_batch=1", "--set", "worker.max_batches=4")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    n = summary["batches"]
    assert n > 4
    assert [w["batches"] for w in summary["workers"]] == [[0, 1, 2, 3], list(range(4, n))]
    # the command shown is what starts the resident model process, not the script launch
    command = summary["plan"][0]["command"]
    assert str(ADAPTER) in command and "s2v_streaming_interact.py" not in command
    assert "--resident_blocks 20 --weight_storage int8" in command  # the 24 GB preset's levers


def test_a_leaking_model_is_replaced_at_the_watermark(media: dict[str, Path], tmp_path: Path,
                                                      lora: Path) -> None:
    out = tmp_path / "t.mp4"
    run = gen(media, out, lora, tmp_path, "--set", "clips_per_batch=1",
              "--set", "worker.rss_growth_mb=250", "--keep-parts",
              env={"LIVEAVATAR_STANDIN_LEAK_MB": "150"})
    assert run.returncode == 0, run.stderr
    workers = manifest(out)["workers"]
    # 6 batches, +150 MiB each: the growth over batch 1 passes 250 MiB after batch 3
    assert len(manifest(out)["parts"]) == 6
    assert [len(w["batches"]) for w in workers] == [3, 3], workers
    assert "host RSS grew" in workers[0]["ended"]
    assert workers[0]["rss_last_mb"] - workers[0]["rss_first_mb"] > 250
    assert loads(tmp_path) == 2
    assert m.video_frames(out) == 150


def test_out_of_memory_replaces_the_worker_and_goes_on_with_the_next_rung(
        media: dict[str, Path], tmp_path: Path, lora: Path) -> None:
    out = tmp_path / "t.mp4"
    run = gen(media, out, lora, tmp_path, "--set", "clips_per_batch=2", "--keep-parts",
              env={"LIVEAVATAR_STANDIN_OOM_UNTIL": "1",
                   "LIVEAVATAR_STANDIN_COUNTER": str(tmp_path / "count")})
    assert run.returncode == 0, run.stderr
    assert "retrying it with rung 1" in run.stderr
    data = manifest(out)
    rungs = sorted(p["rung"] for p in data["parts"])
    assert rungs.count(1) >= 1
    # the worker that ran out of memory ended with the failure; rung 1 (T5 on the CPU, another
    # model) got its own worker
    assert any(w["ended"] == "failure" for w in data["workers"])
    assert loads(tmp_path) >= 2
    assert m.video_frames(out) == 150


def _wait_for(pred, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_sigkill_of_a_resident_worker_renders_only_that_batch_again(
        media: dict[str, Path], tmp_path: Path, lora: Path) -> None:
    out = tmp_path / "t.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]),
         str(media["portrait"]), "-o", str(out), *base_args(lora), "--set", "clips_per_batch=2",
         "--keep-parts", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_for(tmp_path, LIVEAVATAR_STANDIN_DELAY="2"), stdin=subprocess.DEVNULL)
    mpath = Path(f"{out}.parts") / "manifest.json"

    def second_batch_running() -> bool:
        try:
            parts = json.loads(mpath.read_text())["parts"]
        except (OSError, ValueError, KeyError):
            return False
        return parts[0]["state"] == "done" and parts[1]["state"] == "running"

    _wait_for(second_batch_running)
    victim = json.loads(mpath.read_text())["parts"][1]["pid"]
    time.sleep(1.0)  # inside the model's generate
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "rendering it again in a new worker" in stderr
    parts = manifest(out)["parts"]
    assert [p["attempts"] for p in parts] == [1, 2, 1]  # only the killed batch again
    assert m.video_frames(out) == 150
    assert loads(tmp_path) == 2


def _cmdline(pid: int) -> str:
    """A process's command line; "" once it has ended (a child not reaped yet, such as the
    job's finished audio encode, is a zombie with no command line)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def test_sigterm_stops_resident_workers_and_their_models(media: dict[str, Path],
                                                         tmp_path: Path, lora: Path) -> None:
    out = tmp_path / "t.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]),
         str(media["portrait"]), "-o", str(out), *base_args(lora), "--set", "clips_per_batch=2",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_for(tmp_path, LIVEAVATAR_STANDIN_DELAY="30"), stdin=subprocess.DEVNULL)
    _wait_for(lambda: loads(tmp_path) == 1)
    family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert any(str(ADAPTER) in _cmdline(p) for p in family)
    procs = [psutil.Process(p) for p in family if psutil.pid_exists(p)]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    _gone, alive = psutil.wait_procs(procs, timeout=15)
    assert [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def test_rows_with_the_same_model_share_one_load(media: dict[str, Path], tmp_path: Path,
                                                 lora: Path) -> None:
    other = tmp_path / "other" / "liveavatar.safetensors"
    other.parent.mkdir()
    other.write_bytes(b"another LoRA")
    rows = "audio,image,output,preset,prompt,set\n" + "".join(
        f"{media['speech6']},{media['portrait']},{tmp_path}/out{i}.mp4,,,{extra}\n"
        for i, extra in enumerate(["seed=1", "seed=2", f"liveavatar.lora_path={other}"]))
    manifest_csv = tmp_path / "rows.csv"
    manifest_csv.write_text(rows)
    run = subprocess.run(
        [sys.executable, "-m", "avatarcli", "batch", str(manifest_csv), *base_args(lora),
         "--set", "clips_per_batch=3", "--json"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env=env_for(tmp_path))
    assert run.returncode == 0, run.stderr
    assert [r["status"] for r in json.loads(run.stdout)["rows"]] == ["done"] * 3
    # rows 0 and 1 differ in seed only: one worker; row 2 has another LoRA: another load
    assert loads(tmp_path) == 2


# ---- the adapter's calls match the API it calls ---------------------------------------------

def _keywords_passed(source: Path, func: str) -> set[str]:
    tree = ast.parse(source.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else \
                getattr(node.func, "id", None)
            if name == func:
                found |= {k.arg for k in node.keywords if k.arg}
    assert found, f"no call to {func} in {source}"
    return found


def _parameters(source: Path, cls: str, method: str) -> set[str]:
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    args = item.args
                    return {a.arg for a in [*args.args, *args.kwonlyargs]} - {"self"}
    raise AssertionError(f"{cls}.{method} not found in {source}")


def _check_api(repo: Path) -> None:
    pipeline = repo / "liveavatar" / "models" / "wan" / "causal_s2v_pipeline.py"
    assert _keywords_passed(ADAPTER, "WanS2V") <= _parameters(pipeline, "WanS2V", "__init__")
    assert _keywords_passed(ADAPTER, "generate") <= _parameters(pipeline, "WanS2V", "generate")
    assert _keywords_passed(ADAPTER, "add_lora_to_model") <= _parameters(
        pipeline, "WanS2V", "add_lora_to_model")


def test_adapter_calls_match_the_stand_in_api() -> None:
    _check_api(STANDIN)


@pytest.mark.skipif(not os.environ.get("AVATARCLI_LIVEAVATAR_REPO"),
                    reason="AVATARCLI_LIVEAVATAR_REPO does not point to an upstream checkout")
def test_adapter_calls_match_upstream() -> None:
    repo = Path(os.environ["AVATARCLI_LIVEAVATAR_REPO"])
    if not (repo / "liveavatar" / "models" / "wan" / "causal_s2v_pipeline.py").is_file():
        pytest.skip(f"{repo}: no liveavatar/models/wan/causal_s2v_pipeline.py")
    _check_api(repo)


def test_the_adapter_applies_the_memory_levers_to_the_pipeline(tmp_path: Path) -> None:
    """Block swap and int8 storage on the stand-in pipeline's DiT, built with the DiT in host
    memory: the ready event reports the placement of every block."""
    import imageio_ffmpeg

    from avatarcli.procs import free_port

    cmd = [TORCHRUN, "--nproc_per_node=1", f"--master_port={free_port()}", str(ADAPTER),
           "--ckpt_dir", "ckpt/Wan2.2-S2V-14B/",
           "--training_config", "liveavatar/configs/s2v_causal_sft.yaml",
           "--resident_blocks", "4", "--weight_storage", "int8", "--encoders", "cpu",
           "--ffmpeg", imageio_ffmpeg.get_ffmpeg_exe()]
    proc = subprocess.run(cmd, cwd=STANDIN, input='{"task": "exit"}\n', capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ready = json.loads(proc.stdout.splitlines()[0])
    assert ready["event"] == "ready", ready
    levers = ready["levers"]
    assert levers["weight_storage"] == "int8" and levers["encoders"] == "cpu"
    placement = levers["placement"]
    assert len(placement) == 40
    # 4 blocks resident, 36 waiting in host memory: the DiT is never whole on the device
    assert len({p for p in placement}) == 2 and placement.count(placement[0]) in (4, 36)
    assert levers["host_bytes"] > 0
