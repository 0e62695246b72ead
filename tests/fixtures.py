"""Test inputs for avatarcli, all made offline and deterministically (on sys.path as `fixtures`
through pytest's rootdir: the tests folder has no __init__.py).

* Speech and the portrait come from `avatarcli.demo` (re-exported here).
* `tone_speech` is a cheap speech-like signal that needs no synthesiser.
* Audio containers: `transcode` / `audio_variants` re-encode a WAV with ffmpeg (always through
  `avatarcli.media.ffmpeg_bin`).
* Images: `portrait_variants`; `not_face` and `cyclops` are drawn with Pillow.
* `bad_files`: inputs that must be rejected cleanly.
"""

from __future__ import annotations

import math
import random
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from avatarcli.demo import (
    SAMPLE_RATE,
    SENTENCES,
    fade_out,
    portrait,
    portrait_image,
    read_wav,
    save_image,
    speech_track,
    synth_samples,
    synth_speech,
    write_wav,
)
from avatarcli.media import ffmpeg_bin

__all__ = [
    "SAMPLE_RATE",
    "SENTENCES",
    "AudioInfo",
    "astronaut_head",
    "astronaut_head_layout",
    "audio_info",
    "audio_variants",
    "bad_files",
    "cyclops_image",
    "not_face_image",
    "portrait",
    "portrait_image",
    "portrait_variants",
    "read_wav",
    "speech_track",
    "synth_samples",
    "synth_speech",
    "tone_speech",
    "transcode",
    "video_frame_md5s",
    "write_wav",
]

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from avatarcli.engines.builtin.face import FaceLayout


def tone_speech(path: Path, seconds: float, seed: int = 0, *, rate: int = SAMPLE_RATE) -> Path:
    """A cheap speech-like signal (no synthesiser needed), exactly round(seconds * rate) samples.

    Voiced "syllables" (harmonics of a gliding 90-230 Hz pitch shaped by vowel-like formants)
    grouped into words and phrases, short noise bursts as consonants, and pauses of 0.3-1.2 s
    of digital silence between phrases (plus one ~2 s pause near the middle when the track is
    at least 10 s long).
    """
    if not seconds > 0:
        raise ValueError(f"tone_speech: seconds must be > 0, got {seconds}")
    target = round(seconds * rate)
    rnd = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    vowels = (  # F1, F2, F3 in Hz
        (730.0, 1090.0, 2440.0),
        (270.0, 2290.0, 3010.0),
        (300.0, 870.0, 2240.0),
        (530.0, 1840.0, 2480.0),
        (570.0, 840.0, 2410.0),
    )
    bandwidths = (90.0, 110.0, 170.0)
    base_f0 = rnd.uniform(110.0, 190.0)

    def syllable(f0_start: float, f0_end: float, dur: float) -> np.ndarray:
        n = max(1, round(dur * rate))
        t = np.arange(n) / n
        f0 = f0_start + (f0_end - f0_start) * t
        phase = 2.0 * np.pi * np.cumsum(f0) / rate
        formants = rnd.choice(vowels)
        mean_f0 = float(f0.mean())
        k = np.arange(1, int(min(4500.0, rate * 0.45) // mean_f0) + 1, dtype=np.float64)
        freqs = k * mean_f0
        amps = sum(
            math.exp(-i * 0.35) * np.exp(-0.5 * ((freqs - f) / bw) ** 2)
            for i, (f, bw) in enumerate(zip(formants, bandwidths, strict=True))
        ) + 0.02 / k
        wave_ = (amps[:, None] * np.sin(k[:, None] * phase[None, :])).sum(axis=0)
        envelope = np.sin(np.pi * t) ** 0.6
        return np.asarray(wave_ * envelope / max(float(np.abs(wave_).max()), 1e-9))

    def consonant(dur: float) -> np.ndarray:
        n = max(2, round(dur * rate))
        noise = np.diff(noise_rng.random(n + 1) * 2.0 - 1.0)  # crude high-pass
        return np.asarray(noise * np.hanning(n) * rnd.uniform(0.08, 0.25))

    def phrase() -> np.ndarray:
        parts: list[np.ndarray] = []
        words = rnd.randint(3, 6)
        f0 = base_f0 * rnd.uniform(1.05, 1.2)
        for _ in range(words):
            for _ in range(rnd.choice((1, 1, 2, 2, 3))):
                if rnd.random() < 0.5:
                    parts.append(consonant(rnd.uniform(0.04, 0.09)))
                f0_next = max(80.0, f0 * rnd.uniform(0.9, 1.04))
                parts.append(syllable(f0, f0_next, rnd.uniform(0.12, 0.26)) * rnd.uniform(0.5, 1.0))
                f0 = f0_next
            parts.append(np.zeros(round(rnd.uniform(0.0, 0.06) * rate)))
        return np.concatenate(parts)

    out = np.zeros(target, dtype=np.float64)
    pos = min(round(0.25 * rate), target)
    long_pause_after = rnd.uniform(0.25, 0.5) * target
    long_pause_done = seconds < 10.0
    spoken = 0
    while pos < target:
        piece = phrase()
        remaining = target - pos
        if piece.size > remaining:
            if spoken:
                break
            piece = fade_out(piece[:remaining], round(0.03 * rate))
        out[pos : pos + piece.size] = piece * 0.7
        pos += piece.size
        spoken += 1
        room_after_long = target - pos - round(3.2 * rate)  # 2.2 s pause + a short phrase
        if not long_pause_done and pos >= long_pause_after and room_after_long >= 0:
            pos += round(rnd.uniform(1.8, 2.2) * rate)
            long_pause_done = True
        else:
            pos += round(rnd.uniform(0.3, 1.2) * rate)
    return write_wav(Path(path), out, rate)


# ---------------------------------------------------------------------------------------------
# Audio containers through ffmpeg
# ---------------------------------------------------------------------------------------------


def transcode(
    src: Path,
    dst: Path,
    *,
    rate: int | None = None,
    channels: int | None = None,
    codec_args: Sequence[str] = (),
) -> Path:
    """Re-encode `src` into `dst` (container from the suffix) with ffmpeg; returns `dst`."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    args = ["-y", "-loglevel", "error", "-i", str(src), "-map_metadata", "-1"]
    if rate is not None:
        args += ["-ar", str(int(rate))]
    if channels is not None:
        args += ["-ac", str(int(channels))]
    args += [*codec_args, "-fflags", "+bitexact", str(dst)]
    ffmpeg_bin.run(args)
    return dst


# name -> (file name, rate, channels, codec args)
_AUDIO_VARIANTS: dict[str, tuple[str, int | None, int | None, tuple[str, ...]]] = {
    "wav_f32_24k": ("speech_f32_24k.wav", 24000, None, ("-c:a", "pcm_f32le")),
    "mp3_stereo_44k": ("speech_stereo_44k.mp3", 44100, 2, ("-c:a", "libmp3lame", "-b:a", "128k")),
    "m4a_aac": ("speech_aac.m4a", None, None, ("-c:a", "aac", "-b:a", "96k")),
    "flac": ("speech.flac", None, None, ("-c:a", "flac")),
    "wav_8k_phone": ("speech_8k_phone.wav", 8000, 1, ("-c:a", "pcm_s16le")),
    "ogg_opus": ("speech_opus.ogg", 48000, None, ("-c:a", "libopus", "-b:a", "48k")),
}


def audio_variants(src: Path, outdir: Path) -> dict[str, Path]:
    """`src` re-encoded six ways: wav_f32_24k, mp3_stereo_44k, m4a_aac, flac, wav_8k_phone,
    ogg_opus (see `_AUDIO_VARIANTS` for rates and codecs)."""
    outdir = Path(outdir)
    return {
        name: transcode(src, outdir / fname, rate=rate, channels=channels, codec_args=codec)
        for name, (fname, rate, channels, codec) in _AUDIO_VARIANTS.items()
    }


@dataclass(frozen=True)
class AudioInfo:
    """What ffmpeg reports about the first audio stream of a file.

    `duration` is what the container claims (None if it claims nothing); `decoded` is how much
    ffmpeg actually decoded (its last progress time), which is shorter for a truncated file.
    """

    codec: str
    rate: int
    channels: int
    duration: float | None
    decoded: float | None


_CHANNEL_WORDS = {"mono": 1, "stereo": 2, "2.1": 3, "quad": 4, "4.0": 4, "5.0": 5, "5.1": 6}
_AUDIO_LINE = re.compile(r"Stream #\d+:\d+.*?: Audio: (\w+)[^,\n]*, (\d+) Hz, ([^,\n]+)")
_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_PROGRESS = re.compile(r"time=(\d+):(\d+):(\d+(?:\.\d+)?)")


def _hms(m: re.Match[str] | None) -> float | None:
    if m is None:
        return None
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def audio_info(path: Path) -> AudioInfo | None:
    """Decode `path` fully with ffmpeg (raises FFmpegError if that fails) and parse the input
    description: first audio stream's codec, rate and channel count, and the container duration.
    Returns None when the file has no audio stream."""
    full = ffmpeg_bin.run(["-i", str(path), "-f", "null", "-"])
    text = full.split("Output #0", 1)[0]
    m = _AUDIO_LINE.search(text)
    if m is None:
        return None
    layout = m.group(3).strip()
    ch = _CHANNEL_WORDS.get(layout.split("(")[0].strip())
    if ch is None:
        n = re.match(r"(\d+) channels", layout)
        ch = int(n.group(1)) if n else 0
    progress = list(_PROGRESS.finditer(full))
    return AudioInfo(
        codec=m.group(1),
        rate=int(m.group(2)),
        channels=ch,
        duration=_hms(_DURATION.search(text)),
        decoded=_hms(progress[-1]) if progress else None,
    )


def not_face_image(size: int = 256) -> PILImage.Image:
    """A flat-colour cartoon landscape (sky, sun, hills, a house): no face anywhere."""
    from PIL import Image, ImageDraw

    s = size / 256.0
    img = Image.new("RGB", (size, size), (135, 196, 235))
    d = ImageDraw.Draw(img)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        return (round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s))

    d.ellipse(box(186, 22, 236, 72), fill=(250, 210, 60))
    d.ellipse(box(-60, 150, 150, 330), fill=(88, 160, 72))
    d.ellipse(box(90, 165, 330, 340), fill=(70, 140, 60))
    d.rectangle(box(40, 130, 110, 190), fill=(200, 70, 60))
    d.polygon([(round(30 * s), round(130 * s)), (round(75 * s), round(95 * s)),
               (round(120 * s), round(130 * s))], fill=(120, 60, 40))
    d.rectangle(box(66, 158, 84, 190), fill=(90, 50, 30))
    return img


def cyclops_image(size: int = 256) -> PILImage.Image:
    """A simple flat cartoon face with a single eye (nose, mouth, hair), size x size."""
    from PIL import Image, ImageDraw

    s = size / 256.0

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        return (round(x0 * s), round(y0 * s), round(x1 * s), round(y1 * s))

    img = Image.new("RGB", (size, size), (210, 230, 240))
    d = ImageDraw.Draw(img)
    d.rectangle(box(98, 200, 158, 256), fill=(230, 180, 150))  # neck
    d.ellipse(box(58, 40, 198, 216), fill=(236, 188, 160))  # head
    d.chord(box(58, 30, 198, 130), 180, 360, fill=(110, 70, 40))  # hair
    line = max(1, round(2 * s))
    d.ellipse(box(98, 88, 158, 134), fill=(255, 255, 255), outline=(40, 40, 40), width=line)
    d.ellipse(box(116, 99, 140, 123), fill=(60, 110, 170))  # iris
    d.ellipse(box(123, 106, 133, 116), fill=(10, 10, 10))  # pupil
    d.polygon([(round(128 * s), round(140 * s)), (round(120 * s), round(160 * s)),
               (round(136 * s), round(160 * s))], fill=(215, 160, 135))  # nose
    d.arc(box(98, 150, 158, 190), 20, 160, fill=(150, 40, 40), width=max(1, round(4 * s)))  # mouth
    return img


def portrait_variants(outdir: Path) -> dict[str, Path]:
    """Portrait inputs of every awkward kind.

    jpeg: the plain 512x512 portrait. png_alpha: RGBA, transparent outside a centred ellipse
    (the RGB under the transparent part is left as the photo). jpeg_exif_rotated: a 384x512
    (w x h) upright portrait stored as 512x384 pixels rotated 90 degrees counter-clockwise with
    EXIF Orientation=6, so only EXIF-aware loaders show it upright. tiny: 48x48 PNG. not_face:
    256x256 flat cartoon landscape. cyclops: 256x256 cartoon face with one eye.
    """
    from PIL import Image, ImageDraw

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    base = portrait_image(512)
    out: dict[str, Path] = {"jpeg": save_image(base, outdir / "portrait.jpg")}

    mask = Image.new("L", (512 * 4, 512 * 4), 0)  # drawn 4x larger, downsampled: soft edge
    ImageDraw.Draw(mask).ellipse((40 * 4, 8 * 4, 472 * 4, 560 * 4), fill=255)
    rgba = base.convert("RGBA")
    rgba.putalpha(mask.resize((512, 512), Image.Resampling.LANCZOS))
    out["png_alpha"] = save_image(rgba, outdir / "portrait_alpha.png")

    upright = base.crop((64, 0, 448, 512))  # 384 wide, 512 high
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 512 wide, 384 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = outdir / "portrait_exif_rotated.jpg"
    stored.save(path, "JPEG", quality=92, exif=exif.tobytes())
    out["jpeg_exif_rotated"] = path

    out["tiny"] = save_image(
        base.resize((48, 48), Image.Resampling.LANCZOS), outdir / "portrait_tiny.png"
    )
    out["not_face"] = save_image(not_face_image(256), outdir / "not_face.png")
    out["cyclops"] = save_image(cyclops_image(256), outdir / "cyclops.png")
    return out


# ---------------------------------------------------------------------------------------------
# Files that must be rejected
# ---------------------------------------------------------------------------------------------


def bad_files(outdir: Path) -> dict[str, Path]:
    """Inputs that look like something they are not, or hold nothing usable.

    jpeg_named_wav: JPEG bytes named .wav. empty_wav: valid WAV header, zero samples.
    silence_wav: 3 s of digital silence (valid, 22050 Hz mono 16-bit). video_no_audio: 2 s
    H.264 (or MPEG-4 part 2 if ffmpeg lacks libx264) mp4 with no audio stream. text_named_png:
    plain text named .png. truncated_mp3: the first 40% of the bytes of a 6 s mp3, cut
    mid-frame; its Xing header still claims the full 6 s.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    path = outdir / "photo_actually_jpeg.wav"
    portrait_image(128).save(path, "JPEG", quality=85)
    out["jpeg_named_wav"] = path

    out["empty_wav"] = write_wav(outdir / "empty.wav", np.zeros(0, dtype=np.int16))
    out["silence_wav"] = write_wav(outdir / "silence.wav", np.zeros(3 * SAMPLE_RATE, np.int16))

    path = outdir / "video_no_audio.mp4"
    lavfi = ["-y", "-loglevel", "error", "-f", "lavfi", "-i"]
    lavfi.append("testsrc=duration=2:size=320x240:rate=25")
    ff = ffmpeg_bin
    try:
        ff.run([*lavfi, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-an", str(path)])
    except ff.FFmpegError:
        ff.run([*lavfi, "-c:v", "mpeg4", "-an", str(path)])
    out["video_no_audio"] = path

    path = outdir / "not_really_an_image.png"
    path.write_text("This is a plain text file, not a PNG image.\n", encoding="utf-8")
    out["text_named_png"] = path

    with tempfile.TemporaryDirectory(prefix="avatarcli-fixture-") as tmp:
        wav = tone_speech(Path(tmp) / "tone.wav", 6.0, seed=7)
        mp3_args = ("-c:a", "libmp3lame", "-b:a", "64k")
        full = transcode(wav, Path(tmp) / "full.mp3", codec_args=mp3_args)
        data = full.read_bytes()
    path = outdir / "truncated.mp3"
    path.write_bytes(data[: int(len(data) * 0.4) | 1])  # odd length: surely not at a frame edge
    out["truncated_mp3"] = path
    return out


def video_frame_md5s(path: Path) -> list[str]:
    """MD5 of each decoded frame, in order: which frames differ, not only whether any do."""
    import hashlib
    import subprocess

    info = ffmpeg_bin.popen(["-v", "error", "-i", str(path), "-map", "0:v", "-f", "rawvideo",
                            "-pix_fmt", "gray", "-frames:v", "1", "-"], stdout=subprocess.PIPE)
    assert info.stdout is not None
    first = info.stdout.read()
    info.wait()
    if not first:
        raise RuntimeError(f"{path}: ffmpeg could not decode it")
    # One frame's size in yuv420p bytes: the luma plane plus two quarter-size chroma planes.
    size = len(first) * 3 // 2
    proc = ffmpeg_bin.popen(["-v", "error", "-i", str(path), "-map", "0:v", "-f", "rawvideo",
                            "-pix_fmt", "yuv420p", "-"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = []
    while block := proc.stdout.read(size):
        out.append(hashlib.md5(block).hexdigest())
    if proc.wait() != 0:
        raise RuntimeError(f"{path}: ffmpeg could not decode it")
    return out


def astronaut_head(size: int = 512) -> np.ndarray:
    """The astronaut's head from scikit-image's public-domain photo, size x size RGB: the
    animator's tests draw on it (ASTRONAUT_HEAD_LAYOUT is where its face is)."""
    import cv2
    from skimage import data as skdata

    crop = skdata.astronaut()[4:254, 99:349]
    return np.ascontiguousarray(cv2.resize(crop, (size, size), interpolation=cv2.INTER_CUBIC))


def astronaut_head_layout() -> FaceLayout:
    """What find_face reports for astronaut_head(512), fixed here to keep the animator's
    tests independent of the detector."""
    from avatarcli.engines.builtin.face import FaceLayout

    return FaceLayout(
        face=(150.0, 118.0, 212.0, 212.0),
        left_eye=(209.2, 196.6, 22.5, 7.1),
        right_eye=(301.1, 201.9, 21.0, 6.7),
        mouth=(253.4, 283.0, 42.7),
        source="detected",
    )
