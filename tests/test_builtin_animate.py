"""The built-in CPU animator: determinism, locality of changes, blinks, odd portraits."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import cv2
import fixtures
import numpy as np
import pytest

from avatarcli.engines.builtin.animate import Animator, AnimatorOptions, mouth_openness
from avatarcli.engines.builtin.face import FaceLayout, fallback_layout, layout_from_box

skdata = pytest.importorskip("skimage.data")

FPS = 25.0
STILL = AnimatorOptions(head_motion=0.0, blink_rate_per_min=0.0)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """A 512x512 head-and-shoulders crop around the astronaut's face."""
    return fixtures.astronaut_head()


@pytest.fixture(scope="module")
def layout() -> FaceLayout:
    return fixtures.astronaut_head_layout()


def speech(n: int, seed: int = 0) -> np.ndarray:
    """A speech-like openness track: syllables with pauses."""
    rng = np.random.default_rng(seed)
    raw = np.convolve(rng.random(n + 8), np.ones(4) / 4, mode="same")[4 : n + 4]
    return np.clip(raw * 1.6 - 0.4, 0.0, 1.0)


def luma(img: np.ndarray) -> np.ndarray:
    return np.asarray(img, np.float64) @ np.array([0.299, 0.587, 0.114])


def test_output_shape_dtype(portrait: np.ndarray, layout: FaceLayout) -> None:
    anim = Animator(portrait, layout, seed=1, fps=FPS)
    frames = anim.render(np.arange(10, 17, dtype=np.int64), speech(7))
    assert frames.shape == (7, 512, 512, 3)
    assert frames.dtype == np.uint8
    assert frames.flags.c_contiguous
    assert anim.render(np.zeros(0, np.int64), np.zeros(0)).shape == (0, 512, 512, 3)
    with pytest.raises(ValueError):
        anim.render(np.arange(3), np.zeros(2))


def test_batches_join_byte_identical(portrait: np.ndarray, layout: FaceLayout) -> None:
    n = 200
    idx = np.arange(n, dtype=np.int64) + 1000  # blinks and head motion are on
    amount = speech(n, seed=3)
    whole = Animator(portrait, layout, seed=7, fps=FPS).render(idx, amount)
    # Separate instances (separate processes in real runs), uneven chunks, any order.
    first = Animator(portrait, layout, seed=7, fps=FPS)
    second = Animator(portrait, layout, seed=7, fps=FPS)
    b = second.render(idx[100:], amount[100:])
    a = first.render(idx[:100], amount[:100])
    assert np.array_equal(np.concatenate([a, b]), whole)
    pieces = [first.render(idx[s : s + 7], amount[s : s + 7]) for s in range(0, n, 7)]
    assert np.array_equal(np.concatenate(pieces), whole)
    # Something actually moves.
    assert not np.array_equal(whole[0], whole[50])


def test_same_bytes_in_another_process(
    portrait: np.ndarray, layout: FaceLayout, tmp_path: pathlib.Path
) -> None:
    # Workers are separate processes: memory layout and import order must not matter.
    idx = np.arange(480, 520, dtype=np.int64)
    amount = speech(idx.size, seed=5)
    np.save(tmp_path / "portrait.npy", portrait)
    np.save(tmp_path / "amount.npy", amount)
    script = (
        "import json, sys, numpy as np\n"
        "from avatarcli.engines.builtin.animate import Animator\n"
        "from avatarcli.engines.builtin.face import FaceLayout\n"
        "d = sys.argv[1]\n"
        "lay = FaceLayout.from_dict(json.loads(sys.argv[2]))\n"
        "a = Animator(np.load(d + '/portrait.npy'), lay, seed=9, fps=25.0)\n"
        "np.save(d + '/out.npy', a.render(np.arange(480, 520), np.load(d + '/amount.npy')))\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(layout.to_dict())],
        check=True,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    here = Animator(portrait, layout, seed=9, fps=FPS).render(idx, amount)
    assert np.array_equal(np.load(tmp_path / "out.npy"), here)


def test_closed_still_is_the_portrait(portrait: np.ndarray, layout: FaceLayout) -> None:
    anim = Animator(portrait, layout, seed=1, fps=FPS, options=STILL)
    frames = anim.render(np.arange(50), np.zeros(50))
    assert np.array_equal(frames, np.broadcast_to(portrait, frames.shape))
    # Below the visibility threshold still counts as closed.
    assert np.array_equal(anim.render(np.arange(1), np.array([1e-4]))[0], portrait)


def test_mouth_opens_locally(portrait: np.ndarray, layout: FaceLayout) -> None:
    anim = Animator(portrait, layout, seed=1, fps=FPS, options=STILL)
    half, full = anim.render(np.arange(2), np.array([0.5, 1.0]))
    x, y, w, h = layout.face
    diff_full = np.abs(full.astype(int) - portrait).max(axis=-1)
    diff_half = np.abs(half.astype(int) - portrait).max(axis=-1)
    assert diff_full.sum() > diff_half.sum() > 0
    ys, xs = np.nonzero(diff_full)
    # Only the mouth and jaw change: nothing above the nose or beside/below the face.
    assert ys.min() > y + 0.55 * h and ys.max() < y + 1.5 * h
    assert xs.min() > x - 0.1 * w and xs.max() < x + 1.1 * w


def test_mouth_interior_dark_but_not_past_corners(portrait: np.ndarray, layout: FaceLayout) -> None:
    anim = Animator(portrait, layout, seed=1, fps=FPS, options=STILL)
    frame = anim.render(np.arange(1), np.array([1.0]))[0]
    cx, cy, hw = layout.mouth
    before, after = luma(portrait), luma(frame)
    # The astronaut smiles with her upper teeth showing: they stay where they are, and the
    # mouth opens below them.
    line = anim.opening_line
    assert line > cy + 8
    teeth = (slice(int(cy) + 2, int(line) - 4), slice(int(cx - 0.3 * hw), int(cx + 0.3 * hw)))
    assert np.abs(after[teeth] - before[teeth]).max() < 3
    # Inside the opening, just below that line at the centre: much darker.
    inner = (slice(int(line) + 2, int(line) + 8), slice(int(cx - 0.3 * hw), int(cx + 0.3 * hw)))
    assert after[inner].mean() < before[inner].mean() - 60
    assert after[inner].mean() < 80
    # Just beyond each lip corner, on the lip line: no dark line.
    rows = slice(int(cy) - 4, int(cy) + 5)
    for cols in (
        slice(int(cx - hw) - 8, int(cx - hw) - 2),
        slice(int(cx + hw) + 3, int(cx + hw) + 9),
    ):
        assert (before[rows, cols] - after[rows, cols]).max() < 6


def test_teeth_hint_on_closed_lips() -> None:
    # A flat cartoon with closed lips: the opening shows a light band of upper teeth
    # (the astronaut already smiles with teeth, so none are painted there).
    img = np.full((256, 256, 3), (225, 190, 160), np.uint8)
    cv2.ellipse(img, (128, 170), (30, 5), 0, 0, 360, (180, 70, 70), -1)
    layout = dataclasses.replace(layout_from_box(70, 60, 116, 116), mouth=(128.0, 170.0, 30.0))
    frames = {}
    for teeth in (True, False):
        opts = dataclasses.replace(STILL, teeth=teeth)
        frames[teeth] = Animator(img, layout, seed=0, fps=FPS, options=opts).render(
            np.arange(1), np.array([1.0])
        )[0]
    gap = (slice(166, 180), slice(118, 139))
    assert luma(frames[True])[gap].max() > luma(frames[False])[gap].max() + 40


def test_head_motion_is_local_and_seamless(portrait: np.ndarray, layout: FaceLayout) -> None:
    anim = Animator(portrait, layout, seed=2, fps=FPS, options=AnimatorOptions(teeth=False))
    idx = np.arange(0, 25 * 20, 10)
    frames = anim.render(idx, np.zeros(idx.size))
    diff = np.abs(frames.astype(int) - portrait).max(axis=-1)
    assert diff.max() > 20  # the head does move
    x, y, w, h = layout.face
    cx = x + w / 2
    # Outside the head region nothing changes (and the change fades to zero towards it,
    # so there is no seam).
    assert diff[:, :, : int(cx - 0.9 * w)].max() == 0
    assert diff[:, :, int(cx + 0.9 * w) :].max() == 0
    assert diff[:, : int(y - 0.5 * h)].max() == 0
    assert diff[:, int(y + 1.45 * h) :].max() == 0
    ring = diff[:, :, int(cx - 0.85 * w) : int(cx - 0.8 * w)]
    assert ring.max() <= 12


def test_mouth_follows_the_head(portrait: np.ndarray, layout: FaceLayout) -> None:
    # The lip band is computed per pixel, the rest of the map on a coarse grid: with the
    # head moving and the lips barely parted, both must agree (no shifted rows).
    anim = Animator(
        portrait, layout, seed=2, fps=FPS, options=dataclasses.replace(STILL, head_motion=1.0)
    )
    idx = np.arange(0, 500, 25)
    closed = anim.render(idx, np.zeros(idx.size))
    ajar = anim.render(idx, np.full(idx.size, 0.0015))
    assert not np.array_equal(closed, ajar)  # the mouth path did run
    assert np.abs(closed.astype(int) - ajar).max() <= 6


def test_head_pose_amplitude(portrait: np.ndarray, layout: FaceLayout) -> None:
    anim = Animator(portrait, layout, seed=4, fps=FPS)
    poses = np.array([anim.head_pose(i) for i in range(0, 25 * 60)])
    roll, sx, sy, nod = poses.T
    assert 0.5 < np.degrees(np.abs(roll)).max() < 1.6
    assert 0.005 * 212 < np.abs(sx).max() < 0.025 * 212
    assert np.abs(sy).max() < 0.025 * 212 and np.abs(nod).max() < 0.03
    # Smooth: tiny steps between consecutive frames.
    assert np.degrees(np.abs(np.diff(roll))).max() < 0.1
    still = Animator(portrait, layout, seed=4, fps=FPS, options=STILL)
    assert still.head_pose(123) == (0.0, 0.0, 0.0, 0.0)


def blink_starts(anim: Animator, seconds: float) -> np.ndarray:
    b = anim.blink_amount(np.arange(int(seconds * FPS)))
    return np.flatnonzero((b > 0) & (np.concatenate([[0.0], b[:-1]]) == 0))


def test_blinks_rate_and_seed(portrait: np.ndarray, layout: FaceLayout) -> None:
    anim = Animator(portrait, layout, seed=11, fps=FPS)
    starts = blink_starts(anim, 60)
    assert 10 <= starts.size <= 20
    gaps = np.diff(starts) / FPS
    assert gaps.min() >= 1.9 and gaps.max() <= 6.1
    amounts = anim.blink_amount(np.arange(int(60 * FPS)))
    assert amounts.max() == 1.0 and amounts.min() == 0.0
    # Each blink is short: closed-to-open within ~0.25 s.
    assert (amounts > 0).sum() <= starts.size * 0.25 * FPS
    other = blink_starts(Animator(portrait, layout, seed=12, fps=FPS), 60)
    assert not np.array_equal(starts, other)
    assert np.array_equal(starts, blink_starts(Animator(portrait, layout, seed=11, fps=FPS), 60))
    never = Animator(portrait, layout, seed=11, fps=FPS, options=STILL)
    assert never.blink_amount(np.arange(1500)).max() == 0.0


def test_blink_closes_the_eyes(portrait: np.ndarray, layout: FaceLayout) -> None:
    opts = AnimatorOptions(head_motion=0.0)
    anim = Animator(portrait, layout, seed=11, fps=FPS, options=opts)
    amounts = anim.blink_amount(np.arange(250))
    closed = int(np.argmax(amounts))
    frame = anim.render(np.array([closed]), np.zeros(1))[0]
    for cx, cy, hw, hh in (layout.left_eye, layout.right_eye):
        eye = (slice(int(cy - hh), int(cy + hh)), slice(int(cx - hw), int(cx + hw)))
        # The iris and the eye white are covered by lid skin: far less contrast.
        assert luma(frame)[eye].std() < 0.6 * luma(portrait)[eye].std()
    # And the frames around a blink are untouched there.
    open_idx = int(np.flatnonzero(amounts == 0)[0])
    assert np.array_equal(anim.render(np.array([open_idx]), np.zeros(1))[0], portrait)


@pytest.mark.parametrize("shape", [(64, 64), (640, 384), (384, 640)])
def test_odd_portraits(shape: tuple[int, int]) -> None:
    h, w = shape
    rng = np.random.default_rng(h * w)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 0)
    layouts = [
        fallback_layout(w, h),
        layout_from_box(0.2 * w, 0.15 * h, 0.5 * w, 0.5 * w),
        layout_from_box(-0.3 * w, 0.8 * h, 0.6 * w, 0.6 * w),  # partly off the image
        layout_from_box(2 * w, 2 * h, 10, 10),  # entirely off the image
    ]
    idx = np.arange(90, 130, dtype=np.int64)
    amount = speech(idx.size)
    amount[::5] = 1.0
    for i, lay in enumerate(layouts):
        anim = Animator(img, lay, seed=i, fps=30.0)
        frames = anim.render(idx, amount)
        assert frames.shape == (idx.size, h, w, 3) and frames.dtype == np.uint8
        again = np.concatenate(
            [anim.render(idx[:13], amount[:13]), anim.render(idx[13:], amount[13:])]
        )
        assert np.array_equal(frames, again)
        if i < 2:
            assert (frames != img).any()


def test_non_face_photo_with_fallback() -> None:
    coffee = np.ascontiguousarray(skdata.coffee())
    h, w = coffee.shape[:2]
    anim = Animator(coffee, fallback_layout(w, h), seed=0, fps=FPS)
    frames = anim.render(np.arange(0, 60, 6), speech(10))
    assert frames.shape == (10, h, w, 3)
    # Far from the centre nothing changes.
    assert np.array_equal(
        frames[:, :, :40], np.broadcast_to(coffee[:, :40], frames[:, :, :40].shape)
    )


def test_rejects_bad_input(layout: FaceLayout) -> None:
    with pytest.raises(ValueError):
        Animator(np.zeros((32, 32), np.uint8), layout, seed=0, fps=FPS)
    with pytest.raises(ValueError):
        Animator(np.zeros((32, 32, 3), np.float32), layout, seed=0, fps=FPS)
    with pytest.raises(ValueError):
        Animator(np.zeros((32, 32, 3), np.uint8), layout, seed=0, fps=0.0)


def test_mouth_openness_mapping() -> None:
    level = np.linspace(0.0, 1.0, 21, dtype=np.float32)
    voiced = np.full_like(level, 0.8)
    out = mouth_openness(np.stack([level, voiced], axis=1), 1.0)
    assert out.dtype == np.float32 and out.shape == (21,)
    assert out[0] == 0.0 and out[1] == 0.0  # silence / noise floor: closed
    assert np.all(np.diff(out) >= 0) and out[-1] > 0.6
    # Vowels open wider than fricatives at the same loudness.
    vowel = mouth_openness(np.array([[0.6, 0.9]], np.float32), 1.0)[0]
    hiss = mouth_openness(np.array([[0.6, 0.1]], np.float32), 1.0)[0]
    assert vowel > hiss > 0
    # Gain scales, the result stays in [0, 1], bad values are tolerated.
    assert (
        mouth_openness(np.array([[0.5, 0.5]]), 2.0)[0]
        > mouth_openness(np.array([[0.5, 0.5]]), 1.0)[0]
    )
    wild = mouth_openness(np.array([[5.0, 5.0], [-1.0, -1.0], [np.nan, 0.5]]), 10.0)
    assert np.array_equal(wild, np.array([1.0, 0.0, 0.0], np.float32))
    # Per-frame: a frame's value does not depend on its neighbours.
    feats = np.random.default_rng(0).random((50, 2)).astype(np.float32)
    full = mouth_openness(feats, 1.0)
    assert np.array_equal(
        np.concatenate([mouth_openness(feats[:17], 1.0), mouth_openness(feats[17:], 1.0)]), full
    )


def test_grey_portrait_gets_a_grey_mouth(portrait: np.ndarray, layout: FaceLayout) -> None:
    # A red interior in a black-and-white photo reads as paint: the palette follows the face.
    grey = cv2.cvtColor(cv2.cvtColor(portrait, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    frame = Animator(grey, layout, seed=1, fps=FPS, options=STILL).render(
        np.arange(1), np.array([1.0])
    )[0].astype(int)
    changed = np.abs(frame - grey).max(axis=-1) > 30
    assert changed.sum() > 300  # the mouth did open
    spread = frame.max(axis=-1) - frame.min(axis=-1)
    assert spread[changed].max() <= 3
    # ...while the colour photo keeps a reddish interior.
    color = Animator(portrait, layout, seed=1, fps=FPS, options=STILL).render(
        np.arange(1), np.array([1.0])
    )[0].astype(int)
    inside = np.abs(color - portrait).max(axis=-1) > 30
    assert (color[..., 0] - color[..., 2])[inside].mean() > 8
