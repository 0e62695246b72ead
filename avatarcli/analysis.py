"""Per-video-frame speech features, computed once per job in a single streaming pass.

The audio is decoded in chunks, so memory is flat in the recording's length; what is kept is a
few floats per video frame (about 240 KB for 20 minutes at 25 fps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarcli import media

VOICED_BAND_HZ = (80.0, 1000.0)  # vowels and voiced consonants carry most energy here
FULL_BAND_HZ = (80.0, 7000.0)
SILENCE_DB = -60.0  # dBFS: frames below are silence whatever the recording's level
DYNAMIC_RANGE_DB = 40.0  # level 0..1 spans this far below the loud-speech reference


@dataclass(frozen=True)
class AudioFeatures:
    duration_s: float
    frames: int
    db: np.ndarray  # (frames,) float32 loudness per video frame, dBFS
    features: np.ndarray  # (frames, 2) float32: level in [0,1], voiced share in [0,1]
    silent: bool  # nothing above SILENCE_DB anywhere


def analysis_rate(fps: int) -> int:
    """A rate near 16 kHz with a whole number of samples per video frame."""
    return fps * max(1, round(media.ANALYSIS_RATE / fps))


def frame_count(duration_s: float, fps: int) -> int:
    """Frames = ceil(duration * fps); the tolerance absorbs float error at exact multiples."""
    return max(0, math.ceil(duration_s * fps - 1e-6))


def analyse(path: Path, fps: int) -> AudioFeatures:
    """Decode `path` once and return per-frame loudness and voicing."""
    rate = analysis_rate(fps)
    spf = rate // fps
    nfft = 1 << (spf - 1).bit_length()
    freqs = np.fft.rfftfreq(nfft, 1.0 / rate)
    voiced_bins = (freqs >= VOICED_BAND_HZ[0]) & (freqs < VOICED_BAND_HZ[1])
    full_bins = (freqs >= FULL_BAND_HZ[0]) & (freqs < FULL_BAND_HZ[1])
    window = np.hanning(spf).astype(np.float32)

    dbs: list[np.ndarray] = []
    voiced: list[np.ndarray] = []
    carry = np.zeros(0, np.float32)
    total = 0
    for chunk in media.decode_audio_chunks(path, rate=rate, chunk_samples=spf * 250):
        total += len(chunk)
        buf = np.concatenate([carry, chunk]) if carry.size else chunk
        whole = len(buf) // spf * spf
        if whole:
            d, v = _frame_stats(buf[:whole].reshape(-1, spf), window, nfft, voiced_bins, full_bins)
            dbs.append(d)
            voiced.append(v)
        carry = np.array(buf[whole:], dtype=np.float32)
    if carry.size:  # the last partial frame, zero-padded
        last = np.zeros((1, spf), np.float32)
        last[0, : carry.size] = carry
        d, v = _frame_stats(last, window, nfft, voiced_bins, full_bins)
        dbs.append(d)
        voiced.append(v)

    duration = total / rate
    frames = frame_count(duration, fps)
    db = _fit(np.concatenate(dbs) if dbs else np.zeros(0, np.float32), frames, SILENCE_DB - 40)
    vshare = _fit(np.concatenate(voiced) if voiced else np.zeros(0, np.float32), frames, 0.0)
    level = _level(db)
    return AudioFeatures(
        duration_s=duration, frames=frames, db=db,
        features=np.stack([level, vshare], axis=1).astype(np.float32),
        silent=bool(frames == 0 or db.max() < SILENCE_DB),
    )


def _frame_stats(frames: np.ndarray, window: np.ndarray, nfft: int, voiced_bins: np.ndarray,
                 full_bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    db = 20.0 * np.log10(rms + 1e-10)
    power = np.abs(np.fft.rfft(frames * window, n=nfft, axis=1)) ** 2
    full = power[:, full_bins].sum(axis=1)
    share = np.where(full > 1e-12, power[:, voiced_bins].sum(axis=1) / np.maximum(full, 1e-12), 0.0)
    return db.astype(np.float32), share.astype(np.float32)


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
    # Zero-phase smoothing over neighbours: lips cannot move within one frame.
    padded = np.pad(level, 1, mode="edge")
    level = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    return level.astype(np.float32)
