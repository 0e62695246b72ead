"""Benchmark of the built-in engine, end to end, against ffmpeg alone.

    python scripts/bench_builtin.py [--seconds 60] [--long-seconds 600] [--workdir DIR]

1. Speed: `avatar gen` on SECONDS of speech at 512x512, 25 fps (frames per second of wall
   time, process start to verified output), next to ffmpeg alone encoding the same number of
   frames with the same x264 settings, fed from a raw clip the engine rendered (looped).
   Targets: >= 300 frames/s and >= 0.5 of the ffmpeg-alone rate.
   --stages also times each stage on its own: where the time goes.
2. Memory: peak RSS of the parent and of the largest batch process tree (worker + its ffmpeg)
   for SECONDS vs LONG_SECONDS of audio. Target: long/short ratio < 1.15 for both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil

from avatarcli import demo, presets
from avatarcli.engines.builtin.animate import Animator, mouth_openness
from avatarcli.engines.builtin.face import fallback_layout, find_face
from avatarcli.media import ffmpeg_bin
from avatarcli.media.portrait import fit, load

SIZE = 512
FPS = 25


def sample_rss(proc: psutil.Popen, peaks: dict[str, float], stop: threading.Event) -> None:
    """Peak RSS (MB) of the parent and of each batch process tree, sampled every 20 ms."""
    while not stop.is_set():
        try:
            peaks["parent"] = max(peaks.get("parent", 0.0), proc.memory_info().rss / 1e6)
            for child in proc.children():
                tree = [child, *child.children(recursive=True)]
                parts = [p.memory_info().rss / 1e6 for p in tree if p.is_running()]
                if sum(parts) > peaks.get("batch", 0.0):
                    peaks["batch"] = sum(parts)
                    peaks["batch_procs"] = len(parts)
        except psutil.Error:
            pass
        stop.wait(0.02)


X264_PRESET: str | None = None  # --x264-preset: overrides the default preset's


def x264_args() -> list[str]:
    """The x264 settings the parts use, so ffmpeg alone encodes exactly as a part does."""
    opts = presets.resolve(None).preset.builtin
    return ["-c:v", "libx264", "-preset", X264_PRESET or opts.x264_preset, "-crf",
            str(opts.crf), "-pix_fmt", "yuv420p"]


def run_gen(audio: Path, image: Path, out: Path) -> tuple[float, dict[str, float], dict]:
    cmd = [sys.executable, "-m", "avatarcli", "gen", str(audio), str(image), "-o", str(out),
           "--force", "--json", "--set", f"size={SIZE}*{SIZE}",
           *(["--set", f"builtin.x264_preset={X264_PRESET}"] if X264_PRESET else [])]
    peaks: dict[str, float] = {}
    stop = threading.Event()
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=sample_rss, args=(proc, peaks, stop), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"avatar gen failed ({proc.returncode}):\n{stderr}")
    return wall, peaks, json.loads(stdout)


def ffmpeg_alone(image: Path, frames: int, workdir: Path) -> float:
    """Wall seconds for ffmpeg to encode `frames` engine-rendered frames with the same settings."""
    rgb = fit(load(image), SIZE, SIZE)
    layout = find_face(rgb) or fallback_layout(SIZE, SIZE)
    animator = Animator(rgb, layout, seed=420, fps=FPS)
    clip_frames = 250
    feats = np.stack([np.abs(np.sin(np.arange(clip_frames) / 3.0)),
                      np.full(clip_frames, 0.6)], axis=1).astype(np.float32)
    # The same yuv420p frames the engine pipes, so ffmpeg alone gets its fastest input too.
    spread = np.sin(np.arange(clip_frames) / 7.0).astype(np.float32)
    rgb_frames = animator.render(np.arange(clip_frames), mouth_openness(feats, 1.0), spread)
    raw = workdir / "clip.yuv"
    raw.write_bytes(b"".join(cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420).tobytes()
                             for f in rgb_frames))
    t0 = time.perf_counter()
    ffmpeg_bin.run(["-v", "error", "-y", "-stream_loop", "-1", "-f", "rawvideo", "-pix_fmt", "yuv420p",
                "-s", f"{SIZE}x{SIZE}", "-framerate", str(FPS), "-i", str(raw),
                "-frames:v", str(frames), *x264_args(), str(workdir / "alone.mp4")])
    return time.perf_counter() - t0


def stages(audio: Path, image: Path, out: Path, workdir: Path) -> list[tuple[str, float]]:
    """Each stage of `avatar gen` on its own, in wall seconds (what the whole run is made of).

    `out` is the output of a finished run (its part and output are re-verified here).
    """
    from avatarcli import analysis
    from avatarcli.engines.builtin.animate import mouth_spread
    from avatarcli.media import assemble, streams

    def timed(fn: object) -> float:
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        return time.perf_counter() - t0

    rows: list[tuple[str, float]] = []
    rows.append(("process start (python -c pass)",
                 timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))))
    rows.append(("start + imports, parent (avatarcli.cli)", timed(lambda: subprocess.run(
        [sys.executable, "-c", "import avatarcli.cli"], check=True))))
    rows.append(("start + imports, batch process (worker, engine)", timed(lambda: subprocess.run(
        [sys.executable, "-c", "import avatarcli.worker, avatarcli.engines.builtin.engine, "
         "avatarcli.engines.builtin.animate, cv2, PIL.Image"], check=True))))
    feats: list[analysis.AudioFeatures] = []
    rows.append(("analysis (decode audio + features)",
                 timed(lambda: feats.append(analysis.analyse(audio, FPS)))))
    rgb = fit(load(image), SIZE, SIZE)
    layouts: list[object] = []
    rows.append(("face detection", timed(lambda: layouts.append(find_face(rgb)))))
    layout = layouts[0] or fallback_layout(SIZE, SIZE)
    animator = Animator(rgb, layout, seed=420, fps=FPS)  # type: ignore[arg-type]
    f = feats[0].features
    openness, spread = mouth_openness(f, 1.0), mouth_spread(f)
    n = len(openness)
    frame = np.empty((1, SIZE, SIZE, 3), np.uint8)
    yuv = np.empty((SIZE * 3 // 2, SIZE), np.uint8)

    def render() -> None:
        for s in range(0, n, 8):
            animator.render(np.arange(s, min(s + 8, n)), openness[s:s + 8], spread[s:s + 8])

    def convert() -> None:
        for _ in range(n):
            cv2.cvtColor(frame[0], cv2.COLOR_RGB2YUV_I420, dst=yuv)

    rows.append((f"rendering {n} frames (RGB)", timed(render)))
    rows.append((f"colour conversion {n} frames (RGB -> I420)", timed(convert)))
    rows.append((f"x264 encode {n} frames (ffmpeg alone)", ffmpeg_alone(image, n, workdir)))
    part = workdir / "alone.mp4"
    rows.append(("verify a part: full decode (before)",
                 timed(lambda: streams.video_frames(part, decode=True))))
    rows.append(("verify a part: packet count (now)",
                 timed(lambda: streams.video_frames(part, decode=False))))
    joined = workdir / "joined.mp4"
    rows.append(("assembly (concat + AAC 192k + verify)", timed(lambda: assemble.assemble(
        [part], audio, joined, audio_s=feats[0].duration_s, frames=n, width=SIZE, height=SIZE,
        fps=FPS))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--long-seconds", type=float, default=600.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--x264-preset", default=None, help="compare another x264 preset")
    ap.add_argument("--stages", action="store_true",
                    help="also time each stage on its own (where the time goes)")
    args = ap.parse_args()
    global X264_PRESET
    X264_PRESET = args.x264_preset
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="avatar-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    image = demo.portrait(workdir / "portrait.png", size=SIZE)
    short = demo.speech_track(workdir / "short.wav", seconds=args.seconds, seed=1)

    wall, peaks_short, summary = run_gen(short, image, workdir / "short.mp4")
    frames = summary["frames"]
    alone = ffmpeg_alone(image, frames, workdir)
    fps_e2e, fps_alone = frames / wall, frames / alone
    print(f"speed ({args.seconds:g} s of audio, {frames} frames, {SIZE}x{SIZE}, "
          f"{summary['batches']} batch(es), x264 {' '.join(x264_args()[1:6:2])}):")
    print(f"  avatar gen end to end: {wall:6.2f} s  {fps_e2e:7.1f} frames/s "
          f"({fps_e2e / FPS:.1f}x real time)")
    print(f"  ffmpeg alone:          {alone:6.2f} s  {fps_alone:7.1f} frames/s")
    print(f"  ratio: {fps_e2e / fps_alone:.2f} of ffmpeg alone "
          f"(targets: >= 300 frames/s, >= 0.50)")

    if args.stages:
        print("stages, each on its own (wall s; they overlap in a real run):")
        for name, secs in stages(short, image, workdir / "short.mp4", workdir):
            print(f"  {name:50s} {secs:6.3f}")

    if args.long_seconds > 0:
        long = demo.speech_track(workdir / "long.wav", seconds=args.long_seconds, seed=2)
        wall_long, peaks_long, summary_long = run_gen(long, image, workdir / "long.mp4")
        frames_long = summary_long["frames"]
        alone_long = ffmpeg_alone(image, frames_long, workdir)
        print(f"speed ({args.long_seconds:g} s of audio, {frames_long} frames, "
              f"{summary_long['batches']} batches): {frames_long / wall_long:.1f} frames/s end "
              f"to end, ffmpeg alone {frames_long / alone_long:.1f} frames/s, "
              f"ratio {alone_long / wall_long:.2f}")
        print(f"memory (peak RSS, MB): {args.seconds:g} s vs {args.long_seconds:g} s of audio:")
        for key in ("parent", "batch"):
            a, b = peaks_short.get(key, 0.0), peaks_long.get(key, 0.0)
            print(f"  {key:6s}: {a:7.1f} vs {b:7.1f}  ratio {b / a if a else float('nan'):.3f} "
                  f"(target < 1.15)")
        print(f"  (batch peak = the largest batch process tree: {peaks_short.get('batch_procs')} "
              f"vs {peaks_long.get('batch_procs')} processes at that moment)")
    print(f"(files in {workdir})")


if __name__ == "__main__":
    main()
