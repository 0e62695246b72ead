"""The built-in animator on real (espeak-ng) speech: the lips follow loudness and the sound.

Measured from rendered pixels, not from the animator's internals: how much dark mouth
interior shows (opening) and how wide it is (lip shape).
"""

from __future__ import annotations

from pathlib import Path

import fixtures
import numpy as np
import pytest

from avatarcli import analysis
from avatarcli.engines.builtin.animate import (
    Animator,
    AnimatorOptions,
    mouth_openness,
    mouth_spread,
)
from avatarcli.engines.builtin.face import FaceLayout

pytest.importorskip("skimage.data")  # the portrait: fixtures.astronaut_head

FPS = 25
STILL = AnimatorOptions(head_motion=0.0, blink_rate_per_min=0.0)
# Pearson correlation of the visible opening with the audio's loudness (dBFS) on the
# 20 s track below, measured before lip shapes existed (commit 9e9911f): 0.9219 (0.9246 now).
# Lip shapes and closures must not make the lips follow the voice any worse.
CORRELATION_FLOOR = 0.9218
# Median opening width, spread vowels over rounded ones (measured 84 px / 65 px = 1.29).
WIDTH_MARGIN = 1.25

ROUNDED_TEXT = "Who knew? You do. Oh no, go home, you fool. Who moved the blue boot?"
SPREAD_TEXT = "We see thee. Eat cheese, Steve. Ian is here. Keep the green tea key."


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """The astronaut's head, 512x512 (as in test_builtin_animate)."""
    return fixtures.astronaut_head()


@pytest.fixture(scope="module")
def layout() -> FaceLayout:
    return fixtures.astronaut_head_layout()


def luma(img: np.ndarray) -> np.ndarray:
    return np.asarray(img, np.float64) @ np.array([0.299, 0.587, 0.114])


def dark_interior(frames: np.ndarray, portrait: np.ndarray, layout: FaceLayout) -> np.ndarray:
    """Per frame, a boolean map of mouth-area pixels much darker than in the portrait."""
    cx, cy, hw = layout.mouth
    fh = layout.face[3]
    box = (slice(int(cy - 0.1 * fh), int(cy + 0.25 * fh)), slice(int(cx - 1.5 * hw),
                                                                 int(cx + 1.5 * hw)))
    base = luma(portrait)[box]
    return np.stack([luma(f)[box] < base - 40.0 for f in frames])


def render_speech(wav: Path, portrait: np.ndarray, layout: FaceLayout
                  ) -> tuple[analysis.AudioFeatures, np.ndarray, np.ndarray]:
    feats = analysis.analyse(wav, FPS)
    openness = mouth_openness(feats.features, 1.0)
    anim = Animator(portrait, layout, seed=1, fps=FPS, options=STILL)
    frames = anim.render(np.arange(openness.size), openness, mouth_spread(feats.features))
    return feats, openness, frames


def test_lip_opening_follows_loudness(
    portrait: np.ndarray, layout: FaceLayout, tmp_path: Path
) -> None:
    wav = fixtures.speech_track(tmp_path / "speech.wav", seconds=20.0, seed=3)
    feats, _, frames = render_speech(wav, portrait, layout)
    opening = dark_interior(frames, portrait, layout).sum(axis=(1, 2))
    loudness = np.maximum(feats.db, analysis.SILENCE_DB)
    assert opening.max() > 200 and (opening == 0).mean() > 0.1  # opens wide and shuts
    corr = float(np.corrcoef(opening, loudness)[0, 1])
    assert corr >= CORRELATION_FLOOR, f"opening/loudness correlation {corr:.3f}"


def median_width(frames: np.ndarray, openness: np.ndarray, portrait: np.ndarray,
                 layout: FaceLayout) -> float:
    """Median over clearly open frames of the dark interior's width, in px: its widest row."""
    widths = dark_interior(frames, portrait, layout).sum(axis=2).max(axis=1)
    return float(np.median(widths[openness > 0.4]))


def test_rounded_vowels_narrower_than_spread(
    portrait: np.ndarray, layout: FaceLayout, tmp_path: Path
) -> None:
    rounded = fixtures.synth_speech(ROUNDED_TEXT, tmp_path / "rounded.wav")
    spread = fixtures.synth_speech(SPREAD_TEXT, tmp_path / "spread.wav")
    fr, opr, frames_r = render_speech(rounded, portrait, layout)
    fs, ops, frames_s = render_speech(spread, portrait, layout)
    # The analysis hears the difference...
    voiced_r, voiced_s = opr > 0.4, ops > 0.4
    assert voiced_r.sum() > 20 and voiced_s.sum() > 20
    # (medians measured when written: -0.69 and +0.30)
    assert np.median(mouth_spread(fr.features)[voiced_r]) < -0.5
    assert np.median(mouth_spread(fs.features)[voiced_s]) > 0.2
    # ...and the rendered mouth shows it.
    w_r = median_width(frames_r, opr, portrait, layout)
    w_s = median_width(frames_s, ops, portrait, layout)
    assert w_s >= WIDTH_MARGIN * w_r, f"spread {w_s:.0f} px vs rounded {w_r:.0f} px"


def test_closure_shuts_the_lips_while_voiced() -> None:
    level_voiced = np.array([[0.8, 0.9, 0.0, 0.0], [0.8, 0.9, 0.0, 1.0]], np.float32)
    open_, shut = mouth_openness(level_voiced, 1.0)
    assert open_ > 0.5 and shut < 0.5 * open_
    # A job analysed by an older version (two columns) renders with neutral lip shapes.
    old = mouth_openness(level_voiced[:, :2], 1.0)
    assert old[0] == old[1] == open_
    assert np.array_equal(mouth_spread(level_voiced[:, :2]), np.zeros(2, np.float32))


def test_split_batches_byte_identical_with_lip_shapes(
    portrait: np.ndarray, layout: FaceLayout
) -> None:
    n = 120
    rng = np.random.default_rng(4)
    idx = np.arange(n, dtype=np.int64) + 3000  # blinks and head motion on
    openness = np.clip(rng.random(n) * 1.4 - 0.2, 0.0, 1.0)
    spread = np.clip(rng.normal(0.0, 0.8, n), -1.0, 1.0)
    whole = Animator(portrait, layout, seed=5, fps=FPS).render(idx, openness, spread)
    one, two = (Animator(portrait, layout, seed=5, fps=FPS) for _ in range(2))
    later = two.render(idx[53:], openness[53:], spread[53:])
    first = one.render(idx[:53], openness[:53], spread[:53])
    assert np.array_equal(np.concatenate([first, later]), whole)
    pieces = [one.render(idx[s : s + 8], openness[s : s + 8], spread[s : s + 8])
              for s in range(0, n, 8)]
    assert np.array_equal(np.concatenate(pieces), whole)
    # The shape does reach the pixels: the same frames with neutral lips differ.
    neutral = Animator(portrait, layout, seed=5, fps=FPS).render(idx, openness)
    assert not np.array_equal(neutral, whole)


def test_analysis_is_the_same_in_chunks_or_whole(tmp_path: Path) -> None:
    # The features are computed in one streaming pass; a frame's lip cues must not depend
    # on where the decoder's chunks fall (250 frames each): 30 s spans several.
    wav = fixtures.speech_track(tmp_path / "speech.wav", seconds=30.0, seed=5)
    feats = analysis.analyse(wav, FPS).features
    assert feats.shape == (750, 4)
    assert np.isfinite(feats).all()
    assert feats[:, 2].min() >= -1.0 and feats[:, 2].max() <= 1.0
    assert (feats[:, 2] < -0.3).any() and (feats[:, 2] > 0.3).any()
    assert feats[:, 3].min() >= 0.0 and feats[:, 3].max() <= 1.0
