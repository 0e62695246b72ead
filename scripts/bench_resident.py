"""Resident model workers vs one process per batch, with the LiveAvatar stand-in.

The stand-in of upstream's Python API (tests/liveavatar_standin) takes LOAD seconds to build
its pipeline and renders RATE frames/s, so the ideal wall time of a job is one load plus its
frames at that rate. This script measures, on this machine:

- a 10-batch job: resident (worker.max_batches=20) vs one launch per batch (max_batches=1);
- a 20-row manifest of short recordings: rows sharing one resident worker vs a load per row;
- the resident worker's RSS after its first and its last batch (the watermark holds).

    python scripts/bench_resident.py [--load 5] [--rate 50] [--seconds 60] [--rows 20]

Figures only: no pass/fail (the targets are in the issue: resident wall within 10% of
L + frames/R, RSS after 10 batches within 15% of after 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from avatarcli import demo  # offline speech and a portrait

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "liveavatar_standin"


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, check=False)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=float, default=5.0, help="stand-in load time L (s)")
    ap.add_argument("--rate", type=float, default=50.0, help="stand-in render rate R (frames/s)")
    ap.add_argument("--seconds", type=float, default=60.0, help="speech of the 10-batch job")
    ap.add_argument("--rows", type=int, default=20, help="rows of the manifest")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-resident-"))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    lora = work / "liveavatar.safetensors"
    lora.write_bytes(b"stand-in")
    portrait = demo.portrait(work / "portrait.png", size=384)
    speech = demo.speech_track(work / "speech.wav", seconds=args.seconds, seed=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AVATARCLI_HOST_MEM_GB": "256",
           "LIVEAVATAR_STANDIN_LOAD_S": str(args.load),
           "LIVEAVATAR_STANDIN_RENDER_FPS": str(args.rate)}
    common = ["-p", "liveavatar-24gb", "--set", f"liveavatar.repo={STANDIN}",
              "--set", f"liveavatar.torchrun={torchrun}", "--set", f"liveavatar.lora_path={lora}",
              "--set", "liveavatar.env={ENABLE_COMPILE: false}", "--set", "cooldown_s=0",
              "--json", "--keep-parts"]
    avatar = [sys.executable, "-m", "avatarcli"]
    # 24-frame clips; clips_per_batch so that the job has about 10 batches
    clips = max(1, round(args.seconds * 25 / 24 / 10))

    print(f"stand-in: load L = {args.load:g} s (+ torchrun and torch start-up), "
          f"R = {args.rate:g} frames/s; machine: {os.cpu_count()} cores")
    results = {}
    # The script launch runs upstream as it is: no resident-worker levers.
    plain = ["--set", "liveavatar.resident_blocks=40", "--set", "liveavatar.weight_storage=bf16"]
    free = {**env, "LIVEAVATAR_STANDIN_LOAD_S": "0", "LIVEAVATAR_STANDIN_RENDER_FPS": "0"}
    for label, max_batches, run_env in (("resident", 20, env), ("per-batch", 1, env),
                                        ("no-model", 20, free)):
        out = work / f"{label}.mp4"
        wall, summary = run([*avatar, "gen", str(speech), str(portrait), "-o", str(out),
                             *common, "--set", f"clips_per_batch={clips}",
                             "--set", f"worker.max_batches={max_batches}",
                             *(plain if max_batches == 1 else [])], run_env)
        results[label] = (wall, summary)
        manifest = json.loads((Path(f"{out}.parts") / "manifest.json").read_text())
        frames = summary["frames"]
        line = (f"  10-batch job, {label:<9}: {summary['batches']} batches, {frames} frames, "
                f"wall {wall:6.1f} s")
        if manifest.get("workers"):
            w = manifest["workers"][0]
            ideal = w["load_s"] + frames / args.rate
            line += (f"; load measured {w['load_s']:.1f} s, L+frames/R = {ideal:.1f} s, "
                     f"wall/ideal {wall / ideal:.2f}; worker RSS after batch 1 "
                     f"{w['rss_first_mb']:.0f} MiB, after batch {len(w['batches'])} "
                     f"{w['rss_last_mb']:.0f} MiB ({w['rss_last_mb'] / w['rss_first_mb']:.3f}x)")
        print(line)
    print(f"  ratio per-batch / resident: {results['per-batch'][0] / results['resident'][0]:.2f}")
    # What the pipeline itself costs here (slicing, the stand-in drawing and encoding frames,
    # normalising, seam crossfade, checks), with a model that takes no time: the rest of the
    # resident wall time is the model's.
    overhead = results["no-model"][0]
    frames = results["resident"][1]["frames"]
    print(f"  resident wall minus the no-model run ({overhead:.1f} s): "
          f"{results['resident'][0] - overhead:.1f} s vs L + frames/R = "
          f"{args.load + frames / args.rate:.1f} s (configured L)")

    rows_dir = work / "rows"
    rows_dir.mkdir()
    short = demo.speech_track(rows_dir / "short.wav", seconds=3.0, seed=4)
    for label, max_batches in (("resident", 20), ("per-row", 1)):
        csv = rows_dir / f"{label}.csv"
        csv.write_text("audio,image,output,preset,prompt,set\n" + "".join(
            f"{short},{portrait},{rows_dir}/{label}-{i}.mp4,,,seed={i}\n"
            for i in range(args.rows)))
        wall, summary = run([*avatar, "batch", str(csv), *[a for a in common if a != "--keep-parts"],
                             "--set", f"worker.max_batches={max_batches}",
                             *(plain if max_batches == 1 else [])], env)
        done = sum(r["status"] == "done" for r in summary["rows"])
        print(f"  {args.rows}-row manifest, {label:<8}: {done} rows done, wall {wall:6.1f} s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
