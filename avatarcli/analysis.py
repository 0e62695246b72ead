"""Per-video-frame speech features, computed once per job in a single streaming pass.

The audio is decoded in chunks, so memory is flat in the recording's length; what is kept is a
few floats per video frame (about 240 KB for 20 minutes at 25 fps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarcli.media import streams

VOICED_BAND_HZ = (80.0, 1000.0)  # vowels and voiced consonants carry most energy here
FULL_BAND_HZ = (80.0, 7000.0)
# Lip-shape cues: spectral balances in dB between these bands (energy on each side of the
# split), measured on espeak-ng vowels: above 1700 Hz is strong for e/i (F2 ~ 2000-2500 Hz,
# about -4 dB) and weak for o/u and a (-11 to -14 dB); above 1100 Hz tells a (F2 ~ 1200 Hz,
# about -3 dB) from o/u (-6 to -13 dB); a nasal murmur (m, n) has almost nothing at
# 400-1000 Hz next to 80-400 Hz (about -14 dB) and above 1700 Hz (about -25 dB).
SPREAD_SPLIT_HZ = (80.0, 1700.0, 3500.0)
ROUND_SPLIT_HZ = (80.0, 1100.0, 3500.0)
NASAL_SPLIT_HZ = (80.0, 400.0, 1000.0)
SILENCE_DB = -60.0  # dBFS: frames below are silence whatever the recording's level
DYNAMIC_RANGE_DB = 40.0  # level 0..1 spans this far below the loud-speech reference


@dataclass(frozen=True)
class AudioFeatures:
    duration_s: float
    frames: int
    db: np.ndarray  # (frames,) float32 loudness per video frame, dBFS
    # (frames, 4) float32: level in [0,1], voiced share in [0,1], lip spread in [-1,1]
    # (-1 rounded o/u, +1 spread e/i, 0 neutral or unvoiced), closure in [0,1] (a nasal
    # murmur: lips shut while the voice goes on). See FEATURES.
    features: np.ndarray
    silent: bool  # nothing above SILENCE_DB anywhere


def analysis_rate(fps: int) -> int:
    """A rate near 16 kHz with a whole number of samples per video frame."""
    return fps * max(1, round(streams.ANALYSIS_RATE / fps))


def frame_count(duration_s: float, fps: int) -> int:
    """Frames = ceil(duration * fps); the tolerance absorbs float error at exact multiples."""
    return max(0, math.ceil(duration_s * fps - 1e-6))


FEATURES = ("level", "voiced", "spread", "closure")  # the columns of AudioFeatures.features


def analyse(path: Path, fps: int) -> AudioFeatures:
    """Decode `path` once and return per-frame loudness, voicing and lip-shape cues."""
    rate = analysis_rate(fps)
    spf = rate // fps
    nfft = 1 << (spf - 1).bit_length()
    bands = _Bands(np.fft.rfftfreq(nfft, 1.0 / rate))
    window = np.hanning(spf).astype(np.float32)

    stats: list[np.ndarray] = []
    carry = np.zeros(0, np.float32)
    total = 0
    for chunk in streams.decode_audio_chunks(path, rate=rate, chunk_samples=spf * 250):
        total += len(chunk)
        buf = np.concatenate([carry, chunk]) if carry.size else chunk
        whole = len(buf) // spf * spf
        if whole:
            stats.append(_frame_stats(buf[:whole].reshape(-1, spf), window, nfft, bands))
        carry = np.array(buf[whole:], dtype=np.float32)
    if carry.size:  # the last partial frame, zero-padded
        last = np.zeros((1, spf), np.float32)
        last[0, : carry.size] = carry
        stats.append(_frame_stats(last, window, nfft, bands))

    duration = total / rate
    frames = frame_count(duration, fps)
    raw = np.concatenate(stats) if stats else np.zeros((0, 5), np.float32)
    db = _fit(raw[:, 0], frames, SILENCE_DB - 40)
    vshare = _fit(raw[:, 1], frames, 0.0)
    level = _level(db)
    spread, closure = _lip_cues(level, vshare, _fit(raw[:, 2], frames, 0.0),
                                _fit(raw[:, 3], frames, 0.0), _fit(raw[:, 4], frames, 0.0))
    return AudioFeatures(
        duration_s=duration, frames=frames, db=db,
        features=np.stack([level, vshare, spread, closure], axis=1).astype(np.float32),
        silent=bool(frames == 0 or db.max() < SILENCE_DB),
    )


class _Bands:
    """Boolean masks over the FFT bins for each band the features use."""

    def __init__(self, freqs: np.ndarray) -> None:
        def band(lo: float, hi: float) -> np.ndarray:
            return (freqs >= lo) & (freqs < hi)

        self.voiced, self.full = band(*VOICED_BAND_HZ), band(*FULL_BAND_HZ)
        self.splits = [(band(lo, mid), band(mid, hi))
                       for lo, mid, hi in (SPREAD_SPLIT_HZ, ROUND_SPLIT_HZ, NASAL_SPLIT_HZ)]


def _frame_stats(frames: np.ndarray, window: np.ndarray, nfft: int,
                 bands: _Bands) -> np.ndarray:
    """(n, 5): dBFS, voiced share, then the three spectral balances in dB (see the bands)."""
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    db = 20.0 * np.log10(rms + 1e-10)
    power = np.abs(np.fft.rfft(frames * window, n=nfft, axis=1)) ** 2
    full = power[:, bands.full].sum(axis=1)
    share = np.where(full > 1e-12, power[:, bands.voiced].sum(axis=1) / np.maximum(full, 1e-12),
                     0.0)
    cols = [db, share]
    for below, above in bands.splits:
        lo = power[:, below].sum(axis=1) + 1e-12
        hi = power[:, above].sum(axis=1) + 1e-12
        cols.append(10.0 * np.log10(hi / lo))
    return np.stack(cols, axis=1).astype(np.float32)


def _lip_cues(level: np.ndarray, voiced: np.ndarray, spread_db: np.ndarray,
              round_db: np.ndarray, nasal_db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lip spread in [-1, 1] and closure in [0, 1] per frame (see AudioFeatures).

    Read only from voiced, audible frames (a hiss or a pause says nothing about the lips'
    shape: 0); lightly smoothed, like the level.
    """
    trust = np.clip((voiced - 0.3) / 0.4, 0.0, 1.0) * np.clip(level / 0.3, 0.0, 1.0)
    spread = np.clip((spread_db + 10.0) / 4.0, 0.0, 1.0)
    rounded = np.clip((-spread_db - 9.0) / 3.0, 0.0, 1.0) * np.clip((-round_db - 3.0) / 3.0,
                                                                    0.0, 1.0)
    closure = np.clip((-spread_db - 20.0) / 4.0, 0.0, 1.0) * np.clip((-nasal_db - 10.0) / 4.0,
                                                                     0.0, 1.0)
    return _smooth((spread - rounded) * trust), _smooth(closure * trust)


def _smooth(x: np.ndarray) -> np.ndarray:
    """Zero-phase 1-2-1 smoothing over neighbouring frames: lips cannot move within one."""
    if x.size == 0:
        return x.astype(np.float32)
    padded = np.pad(x, 1, mode="edge")
    return (0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]).astype(np.float32)


def _fit(values: np.ndarray, n: int, pad: float) -> np.ndarray:
    out = np.full(n, pad, np.float32)
    out[: min(n, len(values))] = values[:n]
    return out


def _level(db: np.ndarray) -> np.ndarray:
    """Loudness mapped to [0, 1] relative to this recording's loud speech, lightly smoothed."""
    if db.size == 0:
        return db.astype(np.float32)
    active = db[db > SILENCE_DB]
    if active.size == 0:
        return np.zeros_like(db, np.float32)
    ref = float(np.percentile(active, 95))
    floor = max(SILENCE_DB, ref - DYNAMIC_RANGE_DB)
    level = np.clip((db - floor) / max(ref - floor, 1e-3), 0.0, 1.0)
    return _smooth(level)
