"""Benchmark of the Ray executor against local batch processes, on the same job.

    python scripts/bench_ray.py [--seconds 600] [--jobs 2] [--workdir DIR] [--set KEY=VALUE ...]

Renders SECONDS of generated speech (avatarcli/demo.py) with the default preset (plus any
--set), once with local batch processes and once as tasks of a local Ray instance with JOBS
CPUs (each `--jobs` batches at a time), then prints both wall times, and the Ray overhead per
batch: how much longer the driver waited for a batch (submit -> last item received) than the
batch process itself ran on its node (its telemetry wall time). Target: under 1 s per batch.
Both outputs must have the same decoded frames.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_OVERHEAD_S = 1.0


def render(audio: Path, image: Path, out: Path, settings: list[str], jobs: int,
           executor: Any) -> tuple[float, Any]:
    """Wall seconds and the Result of one job; `executor` None: local batch processes."""
    from avatarcli import presets
    from avatarcli.pipeline import generate

    resolved = presets.resolve(None, presets.parse_set(settings))
    started = time.perf_counter()
    result = generate(audio, image, resolved, output=out, jobs=jobs, keep_parts=True,
                      force=True, executor=executor)
    return time.perf_counter() - started, result


def overheads(job_dir: Path) -> list[float]:
    """Per batch: the driver's seconds minus the batch process's own wall seconds."""
    from avatarcli.job import JobDir

    parts = JobDir(job_dir).load()["parts"]
    return [p["seconds"] - p["telemetry"]["wall_s"] for p in parts
            if p.get("seconds") is not None and (p.get("telemetry") or {}).get("wall_s")]


def frames_md5(path: Path) -> str:
    from avatarcli.media.streams import video_frames_md5

    return video_frames_md5(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=600.0, help="speech length (default 600)")
    ap.add_argument("--jobs", type=int, default=2, help="batches at once, and Ray's CPUs")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where inputs and outputs go (default: a temporary folder, removed)")
    ap.add_argument("--set", dest="settings", action="append", default=[],
                    metavar="KEY=VALUE", help="preset override, e.g. clips_per_batch=10")
    args = ap.parse_args(argv)

    from avatarcli import demo
    from avatarcli.ray_executor import RayExecutor

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ray_temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        audio = demo.speech_track(workdir / f"speech{args.seconds:g}.wav",
                                      seconds=args.seconds, seed=7)
        image = demo.portrait(workdir / "portrait.png")
        print(f"inputs: {args.seconds:g} s of speech in {time.perf_counter() - t0:.1f} s")

        local_s, local = render(audio, image, workdir / "local.mp4", args.settings, args.jobs,
                                None)
        print(f"local: {local_s:.1f} s for {len(local.batches)} batches, {args.jobs} at once "
              f"({local.frames} frames, {local.frames / local_s:.0f} frames/s)")

        executor = RayExecutor("local", init_kwargs={"num_cpus": args.jobs,
                                                     "_temp_dir": str(ray_temp)})
        t0 = time.perf_counter()
        executor.ensure_ray()
        init_s = time.perf_counter() - t0
        try:
            ray_s, remote = render(audio, image, workdir / "ray.mp4", args.settings, args.jobs,
                                   executor)
        finally:
            executor.shutdown()
        print(f"ray:   {ray_s:.1f} s for {len(remote.batches)} batches, {args.jobs} at once "
              f"({remote.frames / ray_s:.0f} frames/s; starting Ray took {init_s:.1f} s more)")

        local_over, ray_over = overheads(local.job_dir), overheads(remote.job_dir)
        per_batch = (ray_s - local_s) * args.jobs / max(1, len(remote.batches))
        same = frames_md5(local.output) == frames_md5(remote.output)
        summary = {
            "seconds": args.seconds, "jobs": args.jobs, "batches": len(remote.batches),
            "frames": remote.frames, "local_wall_s": round(local_s, 2),
            "ray_wall_s": round(ray_s, 2), "ray_init_s": round(init_s, 2),
            "ray_overhead_per_batch_s": {
                "mean": round(statistics.mean(ray_over), 3) if ray_over else None,
                "max": round(max(ray_over), 3) if ray_over else None},
            "local_overhead_per_batch_s": {
                "mean": round(statistics.mean(local_over), 3) if local_over else None},
            "wall_difference_per_batch_s": round(per_batch, 3),
            "same_frames": same,
        }
        mean = summary["ray_overhead_per_batch_s"]["mean"]
        print(f"ray overhead per batch: {mean} s mean, "
              f"{summary['ray_overhead_per_batch_s']['max']} s max (driver wait minus the batch "
              f"process's own run; local: {summary['local_overhead_per_batch_s']['mean']} s); "
              f"wall difference per batch: {per_batch:.2f} s; target < {TARGET_OVERHEAD_S:g} s")
        print(f"same decoded frames: {same}")
        print(json.dumps(summary))
        ok = same and mean is not None and mean < TARGET_OVERHEAD_S
        return 0 if ok else 1
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
