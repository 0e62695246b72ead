"""Offline sample inputs for the demo and the benchmarks: speech and a portrait, deterministic.

* Speech: `synth_speech` / `speech_track` use libespeak-ng (from the `espeakng-loader` wheel of
  the `demo` extra) through ctypes.
* Portrait: `portrait` crops the public-domain NASA astronaut photo that ships with
  scikit-image (also in the `demo` extra).

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
import shutil
import tempfile
import threading
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

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


def fade_out(samples: np.ndarray, n: int) -> np.ndarray:
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
                piece = fade_out(clip(queue[0])[:remaining], round(0.03 * rate))
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


def save_image(img: PILImage.Image, path: Path) -> Path:
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
    return save_image(portrait_image(size), path)


DEMO_SENTENCES = (
    "Hello! This is a short demo of avatar C L I.",
    "It turns a voice recording and one portrait into a talking video.",
    "Everything runs offline, right here on your own computer.",
)
DEMO_SECONDS = 12.0


def demo_speech(path: Path) -> Path:
    """The demo sentences with natural pauses, padded with silence to 12 s (22050 Hz mono)."""
    rate = SAMPLE_RATE
    pauses = (0.25, 0.55, 0.45)  # silence before each sentence
    parts: list[np.ndarray] = []
    for pause, text in zip(pauses, DEMO_SENTENCES, strict=True):
        parts.append(np.zeros(round(pause * rate), dtype=np.int16))
        parts.append(synth_samples(text, rate_wpm=165))
    audio = np.concatenate(parts)
    target = round(DEMO_SECONDS * rate)
    if audio.size < target:
        audio = np.concatenate([audio, np.zeros(target - audio.size, dtype=np.int16)])
    return write_wav(path, audio, rate)
