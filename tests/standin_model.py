"""A stand-in talking-head model for `engine: command` tests.

    python standin_model.py --audio A.wav --image I.png (--out O.mp4 | --result_dir D)
                            [--fps N] [--batch B]

Writes a video as long as the audio at --fps (a model with its own frame rate), from the
image, using the same bundled ffmpeg. Every frame is stamped with what produced it: its own
frame index, the batch (--batch) and the loudness of the audio slice under it (see `stamp` and
`read_stamps`), so tests can check order, lag and re-timing from the finished video.

STANDIN_MODE picks a behaviour: success (default), crash, oom, nofile, short, or hang: print
the start line, then wait until the file named by STANDIN_RELEASE exists (forever without it)
and render as usual; or `talk`: a model that restarts at every launch, like LiveAvatar: a dark
mouth opens with the audio's loudness where the face's mouth is, and the whole picture drifts
STANDIN_DRIFT px to the right per frame from the launch's first frame (so parts of one video
jump where they join unless they overlap).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import NamedTuple

import imageio_ffmpeg
import numpy as np

# The stamp: a grid of black/white cells over the top half of the frame, COLS x ROWS cells of
# (width/COLS) x (height/2/ROWS) pixels: big enough to survive scaling and two lossy encodes.
COLS, ROWS = 8, 4
FIELDS = (("index", 10), ("batch", 6), ("loudness", 8), ("check", 8))  # bits, in cell order
LOUDNESS_FLOOR_DB = -80.0
LOUDNESS_STEPS_PER_DB = 3  # stamp = round((dB - floor) * 3): a third of a dB


class Stamp(NamedTuple):
    index: int  # the model's own frame number within its batch (at its own fps)
    batch: int
    loudness: int  # quantised dBFS of the audio the frame was generated from
    check: int  # (index + batch + loudness) % 256: a misread cell shows up


def loudness_code(samples: np.ndarray) -> int:
    """The stamp value of int16 samples: RMS in dBFS, floored at -80, in thirds of a dB."""
    x = samples.astype(np.float64) / 32768.0
    rms = math.sqrt(float(np.mean(x * x))) if x.size else 0.0
    db = 20 * math.log10(max(rms, 10 ** (LOUDNESS_FLOOR_DB / 20)))
    return int(np.clip(round((db - LOUDNESS_FLOOR_DB) * LOUDNESS_STEPS_PER_DB), 0, 255))


def frame_loudness(samples: np.ndarray, rate: int, fps: float, n: int) -> int:
    """loudness_code of frame n's own stretch of audio: [n/fps, (n+1)/fps)."""
    return loudness_code(samples[round(n * rate / fps):round((n + 1) * rate / fps)])


def _bits(stamp: Stamp) -> list[int]:
    out = []
    for (_, width), value in zip(FIELDS, stamp, strict=True):
        out += [(value >> b) & 1 for b in range(width)]
    return out


def stamp(frame: np.ndarray, value: Stamp) -> None:
    """Draw `value` into the top half of an RGB frame (H, W, 3), in place."""
    h, w = frame.shape[:2]
    for i, bit in enumerate(_bits(value)):
        r, c = divmod(i, COLS)
        y0, y1 = r * h // (2 * ROWS), (r + 1) * h // (2 * ROWS)
        x0, x1 = c * w // COLS, (c + 1) * w // COLS
        frame[y0:y1, x0:x1] = 255 if bit else 0


def read_stamp(gray: np.ndarray) -> Stamp:
    """The stamp of a decoded frame (H, W luma); raises ValueError when it does not check."""
    h, w = gray.shape
    bits = []
    for i in range(COLS * ROWS):
        r, c = divmod(i, COLS)
        y0, y1 = r * h // (2 * ROWS), (r + 1) * h // (2 * ROWS)
        x0, x1 = c * w // COLS, (c + 1) * w // COLS
        cy, cx = (y1 - y0) // 4, (x1 - x0) // 4  # the middle half of the cell
        bits.append(int(gray[y0 + cy:y1 - cy, x0 + cx:x1 - cx].mean() > 128))
    values, pos = [], 0
    for _, width in FIELDS:
        values.append(sum(bit << b for b, bit in enumerate(bits[pos:pos + width])))
        pos += width
    found = Stamp(*values)
    if (found.index + found.batch + found.loudness) % 256 != found.check:
        raise ValueError(f"unreadable stamp {found}")
    return found


def read_stamps(video: Path) -> list[Stamp]:
    """The stamp of every frame of a video, decoded with the bundled ffmpeg."""
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-i", str(video)],
                           capture_output=True, text=True)
    import re

    m = re.search(r"Video: .*?, (\d{2,5})x(\d{2,5})", probe.stderr)
    assert m, probe.stderr
    w, h = int(m.group(1)), int(m.group(2))
    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i",
                          str(video), "-map", "0:v", "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                         capture_output=True, check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, h, w)
    return [read_stamp(f) for f in frames]


def read_wav_mono(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2, "16-bit PCM only"
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return data.reshape(-1, w.getnchannels()).mean(axis=1).astype(np.int16), w.getframerate()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--audio", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--out")
    ap.add_argument("--result_dir")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--batch", type=int, default=0)
    args = ap.parse_args()
    mode = os.environ.get("STANDIN_MODE", "success")
    print(f"standin: mode={mode} argv={sys.argv[1:]}", flush=True)
    if mode == "crash":
        raise RuntimeError("simulated model crash")
    if mode == "oom":
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
              file=sys.stderr)
        return 1
    if mode == "hang":
        release = os.environ.get("STANDIN_RELEASE")
        while not (release and Path(release).exists()):
            time.sleep(0.1)
    samples, rate = read_wav_mono(Path(args.audio))
    seconds = samples.size / rate
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
    from PIL import Image

    image = Image.open(args.image).convert("RGB")
    width = 320
    height = round(image.height * width / image.width / 2) * 2
    base = np.asarray(image.resize((width, height)))
    frames = round(seconds * args.fps)
    ffmpeg = subprocess.Popen([
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(args.fps),
        "-i", "-", "-i", args.audio, "-map", "0:v", "-map", "1:a",
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "12", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-shortest", str(out),
    ], stdin=subprocess.PIPE)
    assert ffmpeg.stdin is not None
    for n in range(frames):
        frame = base.copy()
        loud = frame_loudness(samples, rate, args.fps, n)
        index, batch = n % 1024, args.batch % 64
        stamp(frame, Stamp(index, batch, loud, (index + batch + loud) % 256))
        ffmpeg.stdin.write(frame.tobytes())
    ffmpeg.stdin.close()
    return ffmpeg.wait()


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
