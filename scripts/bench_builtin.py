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


def children_cpu() -> float:
    """CPU seconds of the processes this one has waited for (the gen tree, ffmpeg alone)."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


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


def stages(audio: Path, image: Path, out: Path, workdir: Path) -> list[tuple[str, float, float]]:
    """Each stage of `avatar gen` on its own: (name, wall s, CPU s of this process and the
    ones it waited for). CPU is the steadier figure on a shared machine. `out` is the
    output of a finished run (its part and output are re-verified here).
    """
    import resource

    from PIL import Image

    from avatarcli import analysis
    from avatarcli.engines.builtin.animate import mouth_spread
    from avatarcli.engines.builtin.engine import paste_i420
    from avatarcli.media import assemble, streams

    rows: list[tuple[str, float, float]] = []

    def timed(name: str, fn: object) -> None:
        def cpu() -> float:
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            return time.process_time() + kids.ru_utime + kids.ru_stime

        t0, c0 = time.perf_counter(), cpu()
        fn()  # type: ignore[operator]
        rows.append((name, time.perf_counter() - t0, cpu() - c0))

    def python(code: str) -> None:
        subprocess.run([sys.executable, "-c", code], check=True)

    timed("process start (python -c pass)", lambda: python("pass"))
    timed("start + imports, parent (avatarcli.cli)", lambda: python("import avatarcli.cli"))
    timed("start + imports, batch process (worker, engine)", lambda: python(
        "import avatarcli.worker, avatarcli.engines.builtin.engine, "
        "avatarcli.engines.builtin.animate, cv2"))
    timed("ffmpeg -version (the binary's check)", lambda: ffmpeg_bin.run(["-version"]))
    feats: list[analysis.AudioFeatures] = []
    timed("analysis (decode audio + features)",
          lambda: feats.append(analysis.analyse(audio, FPS)))
    rgb = fit(load(image), SIZE, SIZE)
    timed("portrait PNG into the job (PIL, level 6 as now)",
          lambda: Image.fromarray(rgb).save(workdir / "p6.png"))
    timed("portrait PNG into the job (PIL, level 1)",
          lambda: Image.fromarray(rgb).save(workdir / "p1.png", compress_level=1))
    layouts: list[object] = []
    timed("face detection", lambda: layouts.append(find_face(rgb)))
    layout = layouts[0] or fallback_layout(SIZE, SIZE)
    animator = Animator(rgb, layout, seed=420, fps=FPS)  # type: ignore[arg-type]
    f = feats[0].features
    openness, spread = mouth_openness(f, 1.0), mouth_spread(f)
    n = len(openness)
    yuv = np.empty((8, SIZE * 3 // 2, SIZE), np.uint8)
    box = animator.changed_box

    def render_rgb() -> None:
        for s in range(0, n, 8):
            animator.render(np.arange(s, min(s + 8, n)), openness[s:s + 8], spread[s:s + 8])

    def render_rgb_convert() -> None:  # the engine before: whole frames, fresh buffers
        for s in range(0, n, 8):
            frames = animator.render(np.arange(s, min(s + 8, n)), openness[s:s + 8],
                                     spread[s:s + 8])
            buf = np.empty((len(frames), SIZE * 3 // 2, SIZE), np.uint8)
            for k, frame in enumerate(frames):
                cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420, dst=buf[k])

    def render_box() -> None:  # the engine now: the changed box, pasted into kept buffers
        yuv[...] = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
        assert box is not None
        for i in range(n):
            paste_i420(yuv[i % 8], animator.render_box(i, float(openness[i]),
                                                       float(spread[i])), box)

    timed(f"rendering {n} frames, whole RGB frames", render_rgb)
    timed("rendering + I420, whole frames (engine before)", render_rgb_convert)
    timed("rendering + I420, changed box only (engine now)", render_box)
    alone = ffmpeg_alone(image, n, workdir)
    rows.append((f"x264 encode {n} frames (ffmpeg alone; wall only)", alone, float("nan")))
    part = workdir / "alone.mp4"
    timed("verify a part: probe, then full decode (before i16)",
          lambda: (streams.probe(part), streams.video_frames(part, decode=True)))
    timed("verify a part: probe, then packet count (before)",
          lambda: (streams.probe(part), streams.video_frames(part, decode=False)))
    timed("verify a part: probe + packet count, one run (now)",
          lambda: streams.probe_frames(part, decode=False))
    wav = workdir / "timeline.wav"
    streams.decode_to_wav(audio, wav)
    for coder in ("twoloop", "fast"):
        when = "before" if coder == "twoloop" else "now"
        timed(f"AAC 192k of the timeline, {coder} coder ({when})",
              lambda c=coder: ffmpeg_bin.run(["-v", "error", "-y", "-i", str(wav), "-c:a", "aac",
                                          "-aac_coder", c, "-b:a", "192k",
                                          str(workdir / f"{c}.m4a")]))
    joined = workdir / "joined.mp4"
    timed("assembly (concat + fast AAC + verify by packets)", lambda: assemble.assemble(
        [part], wav, joined, audio_s=feats[0].duration_s, frames=n, width=SIZE, height=SIZE,
        fps=FPS, overwrite=True))
    timed("verify output: audio length by decoding (before)",
          lambda: streams.audio_seconds(joined, decode=True))
    timed("verify output: audio length by packets (now)",
          lambda: streams.audio_seconds(joined, decode=False))
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

    cpu0 = children_cpu()
    wall, peaks_short, summary = run_gen(short, image, workdir / "short.mp4")
    cpu1 = children_cpu()
    frames = summary["frames"]
    alone = ffmpeg_alone(image, frames, workdir)
    cpu2 = children_cpu()
    fps_e2e, fps_alone = frames / wall, frames / alone
    print(f"speed ({args.seconds:g} s of audio, {frames} frames, {SIZE}x{SIZE}, "
          f"{summary['batches']} batch(es), x264 {' '.join(x264_args()[1:6:2])}):")
    print(f"  avatar gen end to end: {wall:6.2f} s  {fps_e2e:7.1f} frames/s "
          f"({fps_e2e / FPS:.1f}x real time), CPU {cpu1 - cpu0:.2f} s")
    print(f"  ffmpeg alone:          {alone:6.2f} s  {fps_alone:7.1f} frames/s, "
          f"CPU {cpu2 - cpu1:.2f} s")
    print(f"  ratio: {fps_e2e / fps_alone:.2f} of ffmpeg alone "
          f"(targets: >= 300 frames/s, >= 0.50)")

    if args.stages:
        print("stages, each on its own (they overlap in a real run):")
        print(f"  {'':56s} {'wall s':>7s} {'CPU s':>7s}")
        for name, secs, cpu in stages(short, image, workdir / "short.mp4", workdir):
            print(f"  {name:56s} {secs:7.3f} {cpu:7.3f}")

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
