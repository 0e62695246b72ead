"""A stand-in talking-head model for `engine: command` tests.

    python standin_model.py --audio A.wav --image I.png (--out O.mp4 | --result_dir D) [--fps N]

Writes a video as long as the audio at --fps (a model with its own frame rate), from the
image with a moving bar, using the same bundled ffmpeg. STANDIN_MODE picks a failure:
success (default), crash, oom, nofile, short.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import wave
from pathlib import Path

import imageio_ffmpeg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--audio", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--out")
    ap.add_argument("--result_dir")
    ap.add_argument("--fps", type=float, default=25.0)
    args = ap.parse_args()
    mode = os.environ.get("STANDIN_MODE", "success")
    print(f"standin: mode={mode} argv={sys.argv[1:]}", flush=True)
    if mode == "crash":
        raise RuntimeError("simulated model crash")
    if mode == "oom":
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
              file=sys.stderr)
        return 1
    with wave.open(args.audio) as w:
        seconds = w.getnframes() / w.getframerate()
    if mode == "short":
        seconds /= 2
    out = Path(args.out) if args.out else Path(args.result_dir) / "2026_01_01_00.00.00.mp4"
    if mode == "nofile":
        print(f"saved {out}")  # like models that only log their save errors
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y",
        "-loop", "1", "-framerate", str(args.fps), "-i", args.image, "-i", args.audio,
        "-vf", "scale=320:-2,drawbox=x=0:y=10:w=20:h=20:color=red:t=fill:enable='lt(mod(n,10),5)'",
        "-t", f"{seconds:.3f}", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-shortest", str(out),
    ], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
