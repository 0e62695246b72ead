"""A stand-in talking-head model for `engine: command` tests.

    python standin_model.py --audio A.wav --image I.png (--out O.mp4 | --result_dir D) [--fps N]

Writes a video as long as the audio at --fps (a model with its own frame rate), from the
image with a moving bar, using the same bundled ffmpeg. STANDIN_MODE picks a failure:
success (default), crash, oom, nofile, short; or `talk`: a model that restarts at every
launch, like LiveAvatar: a dark mouth opens with the audio's loudness where the face's mouth
is, and the whole picture drifts STANDIN_DRIFT px to the right per frame from the launch's
first frame (so parts of one video jump where they join unless they overlap).
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
    if mode == "talk":
        talk(Path(args.audio), Path(args.image), out, args.fps,
             float(os.environ.get("STANDIN_DRIFT", "0")))
        return 0
    subprocess.run([
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y",
        "-loop", "1", "-framerate", str(args.fps), "-i", args.image, "-i", args.audio,
        "-vf", "scale=320:-2,drawbox=x=0:y=10:w=20:h=20:color=red:t=fill:enable='lt(mod(n,10),5)'",
        "-t", f"{seconds:.3f}", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-shortest", str(out),
    ], check=True)
    return 0


def talk(audio: Path, image: Path, out: Path, fps: float, drift_px: float) -> None:
    import cv2
    import numpy as np
    from PIL import Image

    from avatarcli.engines.builtin.face import find_face

    with wave.open(str(audio)) as w:
        rate, n = w.getframerate(), w.getnframes()
        pcm = np.frombuffer(w.readframes(n), "<i2").astype(np.float64)
    frames = max(1, round(n / rate * fps))
    per = rate / fps
    rms = np.array([np.sqrt(np.mean(np.square(pcm[int(i * per):int((i + 1) * per)]) + 1e-9))
                    for i in range(frames)])
    opening = np.clip(rms / 2500.0, 0.0, 1.0)  # 16-bit speech at a normal level opens it wide
    with Image.open(image) as im:
        rgb = np.asarray(im.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS))
    face = find_face(rgb)
    cx, cy, hw = face.mouth if face is not None else (128.0, 180.0, 20.0)
    proc = subprocess.Popen([
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "rawvideo",
        "-pix_fmt", "rgb24", "-s", "256x256", "-framerate", str(fps), "-i", "pipe:",
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", "-pix_fmt", "yuv420p", str(out),
    ], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for i in range(frames):
        frame = rgb.copy()
        if opening[i] > 0.02:
            cv2.ellipse(frame, (round(cx), round(cy + 2)),
                        (round(hw * 0.8), max(1, round(hw * 0.6 * opening[i]))), 0, 0, 360,
                        (40, 10, 10), -1, cv2.LINE_AA)
        shift = np.float32([[1, 0, drift_px * i], [0, 1, 0]])
        frame = cv2.warpAffine(frame, shift, (256, 256), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
        proc.stdin.write(frame.tobytes())
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError("ffmpeg failed")


if __name__ == "__main__":
    sys.exit(main())
