"""Test and demo inputs for avatarcli, all made offline and deterministically.

* Speech: `synth_speech` / `speech_track` use libespeak-ng (from the `espeakng-loader` wheel)
  through ctypes; `tone_speech` is a cheap speech-like signal that needs no synthesiser.
* Audio containers: `transcode` / `audio_variants` re-encode a WAV with ffmpeg (always through
  `avatarcli.ffmpeg.run`).
* Images: `portrait` / `portrait_variants` crop the public-domain NASA astronaut photo that ships
  with scikit-image; `not_face` and `cyclops` are drawn with Pillow.
* `bad_files`: inputs that must be rejected cleanly.

Importing this module has no side effects: the speech library is loaded on first use.

Determinism: espeak-ng keeps some synthesis state between utterances (the pitch "flutter"
table position and the "roughness" cycle counter), so the same text comes out slightly
different on each call of a process. To get byte-identical output, `synth_speech` loads the
requested voice with a small variant ("flutter 0", "roughness 8") that switches both off; the
variant file lives in a per-process mirror of espeak-ng-data made of symlinks, in a temporary
folder that is removed at exit. A voice name that already carries a "+variant" is used as given
(and is then not guaranteed to be deterministic).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import math
import os
import random
import re
import shutil
import tempfile
import threading
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "SAMPLE_RATE",
    "SENTENCES",
    "AudioInfo",
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
    "write_wav",
]

# espeak-ng's native output rate; `espeak_Initialize` reports it and we check that it matches.
SAMPLE_RATE = 22050

# Varied English sentences for `speech_track`; each takes about 2-4 s at 160 words per minute.
SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Could you please send me the report before Friday afternoon?",
    "Seventeen zebras quietly shared a pizza with extra cheese.",
    "We measured the temperature every morning for three weeks.",
    "Honestly, I never expected the results to be this good!",
    "Turn left at the old bakery, then walk two blocks north.",
    "The orchestra rehearsed the final movement one more time.",
    "Why does the kettle always whistle just as the phone rings?",
    "Bright yellow kites drifted high above the sandy beach.",
    "Our train leaves at half past nine from platform four.",
    "She painted the fence blue, and then she painted it green.",
    "Thank you all for coming, and enjoy the rest of the evening.",
    "Fresh bread smells wonderful early on a cold winter day.",
    "Please remember to water the tomatoes while I am away.",
    "A gentle breeze carried the scent of pine through the valley.",
    "Is it true that octopuses have three hearts and blue blood?",
)


def _ffmpeg() -> ModuleType:
    """`avatarcli.ffmpeg`, imported on first use (from this checkout if it isn't installed)."""
    try:
        import avatarcli.ffmpeg as mod
    except ImportError:
        import sys

        repo = str(Path(__file__).resolve().parent.parent)
        if not (Path(repo) / "avatarcli" / "ffmpeg.py").is_file():
            raise
        sys.path.insert(0, repo)
        import avatarcli.ffmpeg as mod
    return mod


# ---------------------------------------------------------------------------------------------
# WAV helpers
# ---------------------------------------------------------------------------------------------


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """Write mono 16-bit PCM. Float input is taken as -1..1; integer input as int16 values."""
    path = Path(path)
    data = np.asarray(samples)
    if data.ndim != 1:
        raise ValueError(f"write_wav: expected mono samples (1-D), got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        data = np.round(np.clip(data, -1.0, 1.0) * 32767.0)
    pcm = np.clip(data, -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV as (int16 samples, rate); multi-channel data comes back as (n, ch)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            bits = 8 * w.getsampwidth()
            raise ValueError(f"{path}: only 16-bit PCM is supported, got {bits}-bit")
        channels = w.getnchannels()
        rate = w.getframerate()
        raw = w.readframes(w.getnframes())
    data = np.frombuffer(raw, dtype="<i2").astype(np.int16)
    if channels > 1:
        data = data.reshape(-1, channels)
    return data, rate


# ---------------------------------------------------------------------------------------------
# espeak-ng through ctypes
# ---------------------------------------------------------------------------------------------

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: PLAYBACK=0, RETRIEVAL=1, SYNCHRONOUS=2
_INITIALIZE_DONT_EXIT = 0x8000  # espeakINITIALIZE_DONT_EXIT: return an error instead of exit()
_PARAM_RATE = 1  # espeak_PARAMETER: SILENCE=0, RATE=1, VOLUME=2, PITCH=3, RANGE=4, ...
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_CHARS_UTF8 = 1  # espeakCHARS_UTF8
_EE_OK = 0  # espeak_ERROR: EE_OK=0, EE_INTERNAL_ERROR=-1, EE_BUFFER_FULL=1, EE_NOT_FOUND=2
_EE_NOT_FOUND = 2

# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); return 0 to continue.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# espeak-ng's volume is 0-200, default 100. At 100 some sentences reach full scale, where
# espeak-ng's automatic gain control squashes the peaks (and its gain recovers only while
# speaking, so it can carry into the next utterance); 75 keeps peaks around -3 to -6 dBFS.
_VOLUME = 75

_STEADY_VARIANT = "avatarcli-steady"
_STEADY_VARIANT_TEXT = (
    "language variant\n"
    f"name {_STEADY_VARIANT}\n"
    "flutter 0\n"  # no pitch flutter: its table position persists between utterances
    "roughness 8\n"  # no roughness modulation: its cycle counter persists too
)


def _mirror_data_dir(real: Path) -> Path:
    """A temporary espeak-ng-data lookalike (symlinks) that adds the steady voice variant.

    Returns the folder to pass to espeak_Initialize (it contains `espeak-ng-data`).
    """
    root = Path(tempfile.mkdtemp(prefix="avatarcli-espeak-"))
    owner = os.getpid()  # a forked child that exits normally must not remove the parent's copy

    def cleanup() -> None:
        if os.getpid() == owner:
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)
    data = root / "espeak-ng-data"
    data.mkdir()
    for entry in real.iterdir():
        if entry.name != "voices":
            (data / entry.name).symlink_to(entry)
    voices = data / "voices"
    voices.mkdir()
    real_voices = real / "voices"
    if real_voices.is_dir():
        for entry in real_voices.iterdir():
            if entry.name != "!v":
                (voices / entry.name).symlink_to(entry)
    variants = voices / "!v"
    variants.mkdir()
    if (real_voices / "!v").is_dir():
        for entry in (real_voices / "!v").iterdir():
            (variants / entry.name).symlink_to(entry)
    (variants / _STEADY_VARIANT).write_text(_STEADY_VARIANT_TEXT, encoding="ascii")
    return root


class _Espeak:
    """One initialised libespeak-ng per process; every call holds `lock`."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise RuntimeError(
                "speech synthesis needs libespeak-ng: pip install espeakng-loader"
            ) from exc
        lib_path = str(espeakng_loader.get_library_path())
        real_data = Path(espeakng_loader.get_data_path())
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as exc:
            raise RuntimeError(f"cannot load libespeak-ng from {lib_path}: {exc}") from exc

        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,  # const void *text
            ctypes.c_size_t,  # size
            ctypes.c_uint,  # position
            ctypes.c_int,  # espeak_POSITION_TYPE
            ctypes.c_uint,  # end_position
            ctypes.c_uint,  # flags
            ctypes.POINTER(ctypes.c_uint),  # unique_identifier
            ctypes.c_void_p,  # user_data
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int

        self.variant: str | None = _STEADY_VARIANT
        try:
            data_arg = _mirror_data_dir(real_data)
        except OSError:  # no symlinks here: fall back to the stock data (not deterministic)
            data_arg, self.variant = real_data, None

        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_arg).encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate}) with data at {real_data}")
        self.lib = lib
        self.sample_rate = int(rate)
        self.lock = threading.Lock()
        self._chunks: list[bytes] = []
        # Keep a reference: the C library holds this pointer for the life of the process.
        self._callback = _SYNTH_CALLBACK(self._on_samples)
        lib.espeak_SetSynthCallback(self._callback)
        self._set_seed: Any = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_seed is not None:
            self._set_seed.argtypes = [ctypes.c_long]
            self._set_seed.restype = None

    def _on_samples(self, wav: Any, numsamples: int, _events: Any) -> int:
        if wav and numsamples > 0:
            self._chunks.append(ctypes.string_at(wav, numsamples * 2))
        return 0  # 0 = go on, 1 = abort

    def synth(self, text: str, voice: str, rate_wpm: int, pitch: int) -> bytes:
        """Native-endian int16 samples for `text`."""
        name = voice if ("+" in voice or self.variant is None) else f"{voice}+{self.variant}"
        with self.lock:
            err = self.lib.espeak_SetVoiceByName(name.encode())
            if err == _EE_NOT_FOUND:
                raise ValueError(f"espeak-ng has no voice named {voice!r}")
            if err != _EE_OK:
                raise RuntimeError(f"espeak_SetVoiceByName({name!r}) failed: {err}")
            for param, value in (
                (_PARAM_RATE, rate_wpm),
                (_PARAM_PITCH, pitch),
                (_PARAM_VOLUME, _VOLUME),
            ):
                err = self.lib.espeak_SetParameter(param, value, 0)
                if err != _EE_OK:
                    raise RuntimeError(f"espeak_SetParameter({param}, {value}) failed: {err}")
            if self._set_seed is not None:
                self._set_seed(0)
            encoded = text.encode("utf-8")
            buf = ctypes.create_string_buffer(encoded)  # NUL-terminated
            self._chunks = []
            try:
                err = self.lib.espeak_Synth(
                    buf, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
                )
                if err != _EE_OK:
                    raise RuntimeError(f"espeak_Synth failed: {err}")
                err = self.lib.espeak_Synchronize()
                if err != _EE_OK:
                    raise RuntimeError(f"espeak_Synchronize failed: {err}")
                return b"".join(self._chunks)
            finally:
                self._chunks = []


_ENGINE: _Espeak | None = None
_ENGINE_LOCK = threading.Lock()


def _engine() -> _Espeak:
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = _Espeak()
        return _ENGINE


@functools.lru_cache(maxsize=64)
def _synth_cached(text: str, voice: str, rate_wpm: int, pitch: int) -> bytes:
    return _engine().synth(text, voice, rate_wpm, pitch)


def synth_samples(
    text: str, *, voice: str = "en-us", rate_wpm: int = 160, pitch: int | None = None
) -> np.ndarray:
    """Speak `text` with espeak-ng: int16 mono samples at SAMPLE_RATE (22050 Hz).

    `rate_wpm` is clamped by espeak-ng to about 80-450; `pitch` is 0-100 (None: the default 50).
    Raises RuntimeError without espeakng-loader, ValueError for an unknown voice or empty text.
    """
    if not text.strip():
        raise ValueError("synth_samples: empty text")
    if pitch is not None and not 0 <= pitch <= 100:
        raise ValueError(f"synth_samples: pitch must be 0-100, got {pitch}")
    rate = _engine().sample_rate
    if rate != SAMPLE_RATE:  # pragma: no cover - every espeak-ng build runs at 22050 Hz
        raise RuntimeError(f"espeak-ng runs at {rate} Hz, expected {SAMPLE_RATE}")
    raw = _synth_cached(text, voice, int(rate_wpm), 50 if pitch is None else int(pitch))
    return np.frombuffer(raw, dtype=np.int16).copy()


def synth_speech(
    text: str, path: Path, *, voice: str = "en-us", rate_wpm: int = 160, pitch: int | None = None
) -> Path:
    """Speak `text` offline into a mono 16-bit WAV at 22050 Hz; returns `path`."""
    return write_wav(
        Path(path), synth_samples(text, voice=voice, rate_wpm=rate_wpm, pitch=pitch), SAMPLE_RATE
    )


def _trim_silence(samples: np.ndarray, threshold: int = 80) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > threshold)
    if loud.size == 0:
        return samples[:0]
    return samples[loud[0] : loud[-1] + 1]


def _fade_out(samples: np.ndarray, n: int) -> np.ndarray:
    out = samples.astype(np.float64)
    n = min(n, out.size)
    if n > 0:
        out[-n:] *= np.linspace(1.0, 0.0, n)
    return out


def speech_track(
    path: Path,
    *,
    seconds: float,
    seed: int = 0,
    voice: str = "en-us",
    rate_wpm: int = 160,
) -> Path:
    """A realistic spoken test recording of exactly round(seconds * 22050) samples.

    Sentences from SENTENCES (order picked by `seed`), each at a slightly different level,
    separated by 0.3-1.2 s of digital silence, with one ~2 s pause after the first sentence
    that ends past 25-50% of the track (when the track is at least 10 s long and a sentence
    still fits after it). Starts with 0.25 s of silence; the tail is silence up to the
    requested length (a sentence is never cut unless not even one fits, when the first is cut
    with a short fade-out). Same arguments, same bytes.
    """
    if not seconds > 0:
        raise ValueError(f"speech_track: seconds must be > 0, got {seconds}")
    rate = SAMPLE_RATE
    target = round(seconds * rate)
    rnd = random.Random(seed)
    order = list(range(len(SENTENCES)))
    rnd.shuffle(order)

    def clip(index: int) -> np.ndarray:
        return _trim_silence(synth_samples(SENTENCES[index], voice=voice, rate_wpm=rate_wpm))

    out = np.zeros(target, dtype=np.float64)
    pos = min(round(0.25 * rate), target)
    long_pause_after = rnd.uniform(0.25, 0.5) * target
    long_pause_done = seconds < 10.0
    shortest = min(clip(i).size for i in order)
    queue = order * (1 + math.ceil(seconds / 30.0))  # enough sentences, reused for long tracks
    spoken = 0
    while queue:
        remaining = target - pos
        pick = next((i for i, idx in enumerate(queue) if clip(idx).size <= remaining), None)
        if pick is None:
            if spoken == 0:  # too short for any whole sentence: cut the first one
                piece = _fade_out(clip(queue[0])[:remaining], round(0.03 * rate))
                out[pos : pos + piece.size] = piece * 0.9
            break
        samples = clip(queue.pop(pick)).astype(np.float64)
        gain = rnd.uniform(0.65, 1.0)
        out[pos : pos + samples.size] = samples * gain
        pos += samples.size
        spoken += 1
        room_after_long = target - pos - round(2.2 * rate)
        if not long_pause_done and pos >= long_pause_after and room_after_long >= shortest:
            pause = rnd.uniform(1.8, 2.2)
            long_pause_done = True
        else:
            pause = rnd.uniform(0.3, 1.2)
        pos += round(pause * rate)
        if pos >= target:
            break
    pcm = np.clip(np.round(out), -32768, 32767).astype(np.int16)
    return write_wav(Path(path), pcm, rate)


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
            piece = _fade_out(piece[:remaining], round(0.03 * rate))
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
    _ffmpeg().run(args)
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
    full = _ffmpeg().run(["-i", str(path), "-f", "null", "-"])
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


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

# Head-and-shoulders square inside skimage.data.astronaut() (512x512): the face (Haar box about
# x 177-272, y 66-161) ends up centred horizontally with its centre at about a third of the height.
_ASTRONAUT_CROP = (56, 0, 392, 336)


def portrait_image(size: int = 512) -> PILImage.Image:
    """The astronaut head-and-shoulders portrait as an RGB PIL image, size x size."""
    from PIL import Image

    try:
        from skimage import data as skdata
    except ImportError as exc:
        raise RuntimeError(
            "the portrait fixture needs scikit-image: pip install scikit-image"
        ) from exc
    if size < 1:
        raise ValueError(f"portrait size must be >= 1, got {size}")
    photo = Image.fromarray(np.asarray(skdata.astronaut())).convert("RGB")
    return photo.crop(_ASTRONAUT_CROP).resize((size, size), Image.Resampling.LANCZOS)


def _save_image(img: PILImage.Image, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.convert("RGB").save(path, "JPEG", quality=92)
    else:
        img.save(path, "PNG")
    return path


def portrait(path: Path, *, size: int = 512) -> Path:
    """The public-domain NASA astronaut portrait (Eileen Collins, from scikit-image), framed
    head-and-shoulders, size x size; JPEG for a .jpg/.jpeg suffix, else PNG."""
    return _save_image(portrait_image(size), path)


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
    out: dict[str, Path] = {"jpeg": _save_image(base, outdir / "portrait.jpg")}

    mask = Image.new("L", (512 * 4, 512 * 4), 0)  # drawn 4x larger, downsampled: soft edge
    ImageDraw.Draw(mask).ellipse((40 * 4, 8 * 4, 472 * 4, 560 * 4), fill=255)
    rgba = base.convert("RGBA")
    rgba.putalpha(mask.resize((512, 512), Image.Resampling.LANCZOS))
    out["png_alpha"] = _save_image(rgba, outdir / "portrait_alpha.png")

    upright = base.crop((64, 0, 448, 512))  # 384 wide, 512 high
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 512 wide, 384 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = outdir / "portrait_exif_rotated.jpg"
    stored.save(path, "JPEG", quality=92, exif=exif.tobytes())
    out["jpeg_exif_rotated"] = path

    out["tiny"] = _save_image(
        base.resize((48, 48), Image.Resampling.LANCZOS), outdir / "portrait_tiny.png"
    )
    out["not_face"] = _save_image(not_face_image(256), outdir / "not_face.png")
    out["cyclops"] = _save_image(cyclops_image(256), outdir / "cyclops.png")
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
    ff = _ffmpeg()
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


def video_frames_md5(path: Path) -> str:
    """MD5 of a video's decoded frames: equal for two files that show exactly the same frames."""
    import hashlib
    import subprocess

    proc = _ffmpeg().popen(["-v", "error", "-i", str(path), "-map", "0:v", "-f", "rawvideo",
                            "-"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    h = hashlib.md5()
    while block := proc.stdout.read(1 << 20):
        h.update(block)
    if proc.wait() != 0:
        raise RuntimeError(f"{path}: ffmpeg could not decode it")
    return h.hexdigest()


def video_frame_md5s(path: Path) -> list[str]:
    """MD5 of each decoded frame, in order: which frames differ, not only whether any do."""
    import hashlib
    import subprocess

    info = _ffmpeg().popen(["-v", "error", "-i", str(path), "-map", "0:v", "-f", "rawvideo",
                            "-pix_fmt", "gray", "-frames:v", "1", "-"], stdout=subprocess.PIPE)
    assert info.stdout is not None
    first = info.stdout.read()
    info.wait()
    if not first:
        raise RuntimeError(f"{path}: ffmpeg could not decode it")
    # One frame's size in yuv420p bytes: the luma plane plus two quarter-size chroma planes.
    size = len(first) * 3 // 2
    proc = _ffmpeg().popen(["-v", "error", "-i", str(path), "-map", "0:v", "-f", "rawvideo",
                            "-pix_fmt", "yuv420p", "-"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = []
    while block := proc.stdout.read(size):
        out.append(hashlib.md5(block).hexdigest())
    if proc.wait() != 0:
        raise RuntimeError(f"{path}: ffmpeg could not decode it")
    return out
