"""The built-in CPU animator: one portrait in, speaking frames out.

Each frame is the portrait resampled through one backward map ("output pixel p shows
source pixel map(p)") over a region of interest (ROI) around the head; everything outside
the ROI is the static portrait. The map's displacement is the sum of

* head motion: a small roll about the neck, a slight nod and a drift, faded out by a
  smooth elliptical mask so the ROI border never moves (no seam);
* the mouth: the lower lip and jaw move down (the moving region widening towards the
  chin), the upper lip moves up a quarter as much, and the lip gap that opens is painted
  as a mouth interior shaped like a lens that tapers to nothing at the lip corners;
* blinks: the lid skin above each eye is stretched down over the eye opening.

Every frame is a pure function of its global frame index (plus portrait, layout, seed,
options and that frame's openness): blink times and head motion come from the seed and
the index alone, and no state carries over between frames, so batches rendered by
different processes join seamlessly.

Speed (the encoder needs 250+ frames/s on two cores): the smooth part of the map is
evaluated on a grid 5x coarser and upsampled with ``cv2.resize`` (bilinear, exact for
the affine head motion); only the few rows around the lip line, where the map is
discontinuous, and the eyes during a blink are computed per pixel. The resampling itself
is ``cv2.remap`` (fixed-point bilinear straight on uint8), several times faster on a CPU
than ``torch.nn.functional.grid_sample`` on float32 plus the conversions around it; the
remaining arithmetic is on small arrays, where numpy's per-call overhead is lowest.
Frames are rendered one at a time with element-wise operations whose results are exact
or table-driven (no vectorised transcendental kernels, no cross-frame reductions), so
the bytes never depend on how frames are batched.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from .face import FaceLayout

F32 = np.float32

# --- proportions, relative to the face box height (fh) unless noted --------------------
_MOUTH_TRAVEL = 0.08  # lower-lip travel at openness 1 (the whole gap is 1.25x this)
_UPPER_LIP_SHARE = 0.15  # upper-lip travel / lower-lip travel (0 when the teeth show)
_CHIN = 0.30  # lip line -> chin; the jaw moves down rigidly to here
_CHIN_FADE = 0.22  # below the chin the jaw motion fades out over this length
_UPPER_FADE = 0.13  # lip line -> base of the nose, where the upper-lip motion is gone
_JAW_WIDEN = 0.8  # the moving region is (1 + this) x the mouth width at the chin
_ROI_X = 0.85  # ROI half-width / face width
_ROI_TOP, _ROI_BOTTOM = 0.45, 1.40  # ROI extent above / below the face box top (x fh)
_MASK_IN, _MASK_OUT = 0.62, 0.97  # head mask: 1 inside this radius, 0 beyond that one
_PIVOT = 1.30  # head roll/nod pivot (the neck) below the face box top (x fh)
_BROW = 3.6  # eyebrow line above the eye centre (x eye half-height); blinks stop there
_LID_OVERSHOOT = 1.1  # a closed lid reaches a little past the lower lid line
_LID_WIDEN = 1.12  # the lid covers a little more than the detected eye width

# Head motion amplitudes at head_motion=1.
_ROLL_DEG = 1.1
_SHIFT_X = 0.012  # x face width
_SHIFT_Y = 0.008  # x face height
_NOD = 0.012  # vertical scale about the neck pivot

# Blink timing (seconds): fast close, short hold, slower open.
_BLINK_CLOSE, _BLINK_HOLD, _BLINK_OPEN = 0.06, 0.03, 0.09

# Lip shapes: mouth width x (1 + this) when fully spread (e/i), x (1 - this) when fully
# rounded (o/u); a spread mouth opens a little less, a rounded one a little more.
_SPREAD_WIDEN, _ROUND_NARROW = 0.15, 0.25
_CLOSURE_DEPTH = 0.6  # a full closure (m, n) takes this share of the opening
_SPREAD_FLATTEN, _ROUND_DEEPEN = 0.1, 0.0
_SQUEEZE_LIPS = 0.06  # lip thickness (x fh) that the width change carries fully
_SQUEEZE_FADE = 0.07  # beyond the lips it fades out over this (x fh)

# Mouth interior colours (RGB): the back of the mouth, the lit inside of the lips,
# the tongue and the teeth.
_CAVITY = np.array([28.0, 9.0, 11.0])
_INNER_LIP = np.array([112.0, 44.0, 48.0])
_TONGUE = np.array([150.0, 66.0, 68.0])
_TEETH = np.array([218.0, 210.0, 196.0])
_MAX_TEETH_SCAN = 0.09  # how far below the lip line visible teeth are looked for (x fh)

_K = 5  # coarse-grid step in pixels (odd: cv2.resize then hits grid points exactly)

_Eye = tuple[float, float, float, float]  # (cx, cy, half_width, half_height)
_Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, end-exclusive


@dataclass(frozen=True)
class AnimatorOptions:
    """Knobs of the built-in animator."""

    mouth_gain: float = 1.0  # speech -> mouth opening gain; applied by mouth_openness()
    blink_rate_per_min: float = 15.0  # average blinks per minute; 0 = never blink
    head_motion: float = 1.0  # head sway amplitude: 1 = subtle default, 0 = still
    teeth: bool = True  # paint a hint of upper teeth when the mouth opens wide


def _feature_columns(features: np.ndarray) -> np.ndarray:
    """(N, 4) float32 features; (N, 2) ones (a job analysed by an older version) get
    neutral lip shapes."""
    feats = np.asarray(features, dtype=F32)
    if feats.ndim != 2 or feats.shape[1] not in (2, 4):
        feats = feats.reshape(-1, 2)
    if feats.shape[1] == 2:
        feats = np.concatenate([feats, np.zeros((feats.shape[0], 2), F32)], axis=1)
    return feats


def mouth_openness(features: np.ndarray, gain: float) -> np.ndarray:
    """Per-frame mouth opening in [0, 1] from analysis features of shape (N, 4) or (N, 2).

    A pure per-frame mapping: loudness opens the mouth (past a noise gate, so pauses close
    it), voiced energy opens it further (vowels wide, fricatives narrow), and a closure
    (a nasal murmur: m, n) shuts it while the voice goes on.
    """
    feats = _feature_columns(features)
    level = np.clip(np.nan_to_num(feats[:, 0]), 0.0, 1.0)
    voiced = np.clip(np.nan_to_num(feats[:, 1]), 0.0, 1.0)
    shut = np.clip(np.nan_to_num(feats[:, 3]), 0.0, 1.0)
    # Gate the noise floor, then a soft knee (x^0.75, via exact square roots so the value
    # never depends on the array a frame sits in): moderate speech already opens visibly.
    x = np.clip((level - 0.06) / 0.64, 0.0, 1.0)
    root = np.sqrt(x)
    loud = root * np.sqrt(root)
    shape = 0.45 + 0.55 * voiced
    # A closure takes most of the opening, not all: the level is smoothed over neighbouring
    # frames, so a short m would otherwise snap the lips shut mid-syllable (measured: full
    # closures lowered the opening/loudness correlation on espeak-ng speech to 0.907).
    close = 1.0 - _CLOSURE_DEPTH * shut
    return np.clip(loud * shape * close * float(gain), 0.0, 1.0).astype(F32)


def mouth_spread(features: np.ndarray) -> np.ndarray:
    """Per-frame lip shape in [-1, 1] (-1 rounded o/u, +1 spread e/i, 0 neutral)."""
    feats = _feature_columns(features)
    return np.clip(np.nan_to_num(feats[:, 2]), -1.0, 1.0).astype(F32)


# --- deterministic pseudo-randomness -------------------------------------------------

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    # splitmix64 finaliser: a well-spread 64-bit hash of an integer.
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _unit(seed: int, *keys: int) -> float:
    """A uniform number in [0, 1) that depends only on the seed and the keys."""
    h = _mix64(seed & _M64)
    for k in keys:
        h = _mix64(h ^ (k & _M64))
    return (h >> 11) / float(1 << 53)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _smooth1(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def _span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Integer pixel span [a, b) covering [lo, hi], clipped to [0, limit)."""
    return max(0, min(limit, math.floor(lo))), max(0, min(limit, math.ceil(hi) + 1))


@dataclass(frozen=True)
class _Pose:
    """One frame's backward head map: source = p + mask(p) * (A (p - pivot) + c)."""

    a00: float
    a01: float
    a10: float
    a11: float
    cx: float
    cy: float

    @property
    def still(self) -> bool:
        return not (self.a00 or self.a01 or self.a10 or self.a11 or self.cx or self.cy)


class Animator:
    """Renders speaking frames of one portrait; see the module docstring.

    Not thread-safe (it reuses internal buffers): use one instance per thread.
    """

    def __init__(
        self,
        portrait: np.ndarray,
        layout: FaceLayout,
        *,
        seed: int,
        fps: float,
        options: AnimatorOptions = AnimatorOptions(),
    ) -> None:
        img = np.asarray(portrait)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"portrait must be uint8 HxWx3, got {img.dtype} {img.shape}")
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be positive, got {fps}")
        self.portrait = np.array(img, dtype=np.uint8, order="C")  # own copy: frames never alias
        self.layout = layout
        self.seed = int(seed)
        self.fps = float(fps)
        self.options = options
        self._height, self._width = img.shape[:2]

        fx, fy, fw, fh = layout.face
        self._fw, self._fh = max(fw, 4.0), max(fh, 4.0)
        fw, fh = self._fw, self._fh
        fcx = fx + 0.5 * fw
        self._pivot = (fcx, fy + _PIVOT * fh)
        top, bottom = fy - _ROI_TOP * fh, fy + _ROI_BOTTOM * fh
        # The head mask: an ellipse filling the (unclipped) ROI.
        self._ellipse = (fcx, 0.5 * (top + bottom), _ROI_X * fw, 0.5 * (bottom - top))
        rx0, rx1 = _span(fcx - _ROI_X * fw, fcx + _ROI_X * fw, self._width)
        ry0, ry1 = _span(top, bottom, self._height)
        self._roi = (rx0, ry0, rx1, ry1)
        self._has_roi = rx1 - rx0 >= 2 and ry1 - ry0 >= 2
        self._canvas: np.ndarray | None = None  # render_box's frame, the portrait outside
        self._setup_schedule()
        self._setup_mouth()
        if self._has_roi:
            self._setup_grid()
            self._setup_eyes()
            self._setup_strips()

    # --- set-up --------------------------------------------------------------------------

    def _mask(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ex, ey, erx, ery = self._ellipse
        rho = np.sqrt(((x - ex) / erx) ** 2 + ((y - ey) / ery) ** 2)
        return 1.0 - _smoothstep((rho - _MASK_IN) / (_MASK_OUT - _MASK_IN))

    def _setup_grid(self) -> None:
        """The coarse grid, its static terms, and the full-resolution map buffers."""
        rx0, ry0, rx1, ry1 = self._roi
        wr, hr = rx1 - rx0, ry1 - ry0
        half = (_K - 1) // 2
        # Coarse sample j sits at rx0 - K + K*j; cv2.resize by K puts it at buffer column
        # half + K*j, so the ROI starts at buffer column K + half (likewise for rows), and
        # one extra sample on each side keeps the ROI clear of resize's edge clamping.
        nx, ny = math.ceil((wr + half + 1) / _K) + 2, math.ceil((hr + half + 1) / _K) + 2
        xs = (rx0 - _K + _K * np.arange(nx)).astype(np.float64)
        ys = (ry0 - _K + _K * np.arange(ny)).astype(np.float64)
        gx, gy = np.meshgrid(xs, ys)
        mask = self._mask(gx, gy)
        self._cx_abs = gx.astype(F32)
        self._cy_abs = gy.astype(F32)
        self._cm = mask.astype(F32)
        self._cmx = (mask * (gx - self._pivot[0])).astype(F32)
        self._cmy = (mask * (gy - self._pivot[1])).astype(F32)
        self._coarse_xs, self._coarse_ys = xs, ys
        self._lowx = np.empty((ny, nx), F32)
        self._lowy = np.empty((ny, nx), F32)
        self._tmp = np.empty((ny, nx), F32)
        self._bufx = np.empty((ny * _K, nx * _K), F32)
        self._bufy = np.empty((ny * _K, nx * _K), F32)
        b0 = _K + half
        self._mapx = self._bufx[b0 : b0 + hr, b0 : b0 + wr]
        self._mapy = self._bufy[b0 : b0 + hr, b0 : b0 + wr]
        # Coarse cells touched by the mouth's smooth field (rows/cols of the coarse grid).
        if self._mouth_box is not None:
            x0, y0, x1, y1 = self._mouth_box
            cj0, cj1 = np.searchsorted(xs, [x0 - _K, x1 + _K])
            ci0, ci1 = np.searchsorted(ys, [y0 - _K, y1 + _K])
            self._mouth_cells: tuple[int, int, int, int] | None = (
                int(ci0),
                int(ci1),
                int(cj0),
                int(cj1),
            )
        else:
            self._mouth_cells = None

    def _setup_mouth(self) -> None:
        mcx, lip_y, mhw = self.layout.mouth
        fw, fh = self._fw, self._fh
        self._mhw = max(mhw, 1.0)
        # A smile that shows its upper teeth opens below them: the teeth stay with the
        # skull and only the lower lip and jaw drop (no painted teeth, no upper-lip lift).
        self._teeth_depth, teeth_hw = self._find_teeth()
        lip_y += self._teeth_depth
        if self._teeth_depth > 0.0:
            # Below a smile's teeth the opening is as wide as the teeth's lower edge, not
            # the smile (whose corners sit higher up).
            self._mhw = max(min(self._mhw, teeth_hw), 0.75 * self._mhw)
        self._up_share = 0.0 if self._teeth_depth > 0.0 else _UPPER_LIP_SHARE
        self._mouth_c = (mcx, lip_y)
        self._travel = _MOUTH_TRAVEL * fh
        # Exact per-pixel work is needed only in a band around the lip line: the gap
        # (up to 1.25 x travel tall) plus one coarse cell each side, where the upsampled
        # map mixes values across the lip line. Profiles are kept flat over that band.
        self._band_up = max(self._up_share * self._travel, _K) + 1.0
        self._band_down = max(self._travel, _K) + 1.0
        flat_up = self._band_up + 1.0
        flat_down = self._band_down + 1.0
        lift_max = self._up_share * self._travel
        self._up_start = flat_up
        self._up_len = max(_UPPER_FADE * fh - flat_up, 3.0 * lift_max + 2.0)
        self._widen_start = flat_down
        self._chin = max(_CHIN * fh, flat_down + 2.0 * self._travel + 2.0)
        self._chin_fade = max(_CHIN_FADE * fh, 2.0 * self._travel + 2.0)
        # Vertical profiles of the lip and jaw motion, tabulated over s (distance below
        # the lip line, 1/16 px steps) so each frame only interpolates them.
        lo = -(self._up_start + self._up_len) - _K - 2.0
        hi = self._chin + self._chin_fade + _K + 2.0
        s_tab = np.arange(lo, hi + 1.0 / 16.0, 1.0 / 16.0)
        self._s_tab = s_tab
        self._lift_tab = np.where(
            s_tab < 0.0,
            self._up_share * (1.0 - _smoothstep((-s_tab - self._up_start) / self._up_len)),
            0.0,
        )
        self._drop_tab = np.where(
            s_tab < 0.0, 0.0, 1.0 - _smoothstep((s_tab - self._chin) / self._chin_fade)
        )
        # The moving region widens below the lips, so the chin moves as a block while
        # the lip corners stay put.
        widen = _smoothstep((s_tab - self._widen_start) / (self._chin - self._widen_start))
        self._inv_w2_tab = 1.0 / (self._mhw * (1.0 + _JAW_WIDEN * widen)) ** 2
        self._rows_f = np.arange(self._height, dtype=np.float64)
        self._cols_f = np.arange(self._width, dtype=np.float64)
        # Soft edge of the painted interior, in pixels (the photo's own edges are soft).
        self._feather = max(1.2, 0.012 * fh)
        self._palette = self._mouth_palette()
        self._paint_teeth = self.options.teeth and self._teeth_depth == 0.0
        # Output region the mouth can affect, with room for the head motion.
        margin = 0.05 * max(fw, fh) + 2.0
        reach = self._mhw * (1.0 + _JAW_WIDEN) + margin
        x0, x1 = _span(mcx - reach, mcx + reach, self._width)
        y0, y1 = _span(
            lip_y - self._up_start - self._up_len - margin,
            lip_y + self._chin + self._chin_fade + margin,
            self._height,
        )
        rx0, ry0, rx1, ry1 = self._roi
        x0, x1, y0, y1 = max(x0, rx0), min(x1, rx1), max(y0, ry0), min(y1, ry1)
        self._mouth_box = (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
        self._mouth_mask: np.ndarray | None = None
        if self._mouth_box is not None and self._has_roi:
            # The band's exact head map needs the mask at full resolution there.
            ys = np.arange(y0, y1, dtype=np.float64)
            xs = np.arange(x0, x1, dtype=np.float64)
            gx, gy = np.meshgrid(xs, ys)
            m = self._mask(gx, gy)
            self._mouth_mask = None if m.min() >= 1.0 else m.astype(F32)

    def _mouth_palette(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cavity, inner lip, tongue and teeth colours, as colourful as the face is.

        A black-and-white photo gets grey ones (a red mouth in a grey face reads as paint).
        """
        x, y, w, h = self.layout.face
        a, b = _span(x + 0.2 * w, x + 0.8 * w, self._width)
        c, d = _span(y + 0.2 * h, y + 0.8 * h, self._height)
        px = self.portrait[c:d, a:b].reshape(-1, 3).astype(F32)
        chroma = float(np.median(px.max(axis=1) - px.min(axis=1))) if px.size else 0.0
        sat = min(max(chroma / 30.0, 0.0), 1.0)
        weights = np.array([0.299, 0.587, 0.114])

        def tone(rgb: np.ndarray) -> np.ndarray:
            grey = float(rgb @ weights)
            return grey + sat * (rgb - grey)

        return tone(_CAVITY), tone(_INNER_LIP), tone(_TONGUE), tone(_TEETH)

    def _find_teeth(self) -> tuple[float, float]:
        """How far below the lip line the portrait shows upper teeth (a smile), in px, and
        the half-width of their lower edge; (0, 0): no teeth.

        Teeth are about as bright as the cheeks and no more saturated, unlike a lip: rows
        of the mouth's middle are scanned down from the lip line while they look like teeth.
        """
        mcx, lip_y, mhw = self.layout.mouth
        fh = self._fh

        def patch(x0: float, x1: float, y0: float, y1: float) -> np.ndarray | None:
            a, b = _span(x0, x1, self._width)
            c, d = _span(y0, y1, self._height)
            if b <= a or d <= c:
                return None
            hsv = cv2.cvtColor(np.ascontiguousarray(self.portrait[c:d, a:b]), cv2.COLOR_RGB2HSV)
            return hsv.astype(F32)

        cheeks = [
            patch(
                mcx + side * 1.4 * mhw - 0.1 * fh,
                mcx + side * 1.4 * mhw + 0.1 * fh,
                lip_y - 0.25 * fh,
                lip_y - 0.1 * fh,
            )
            for side in (-1.0, 1.0)
        ]
        found = [c.reshape(-1, 3) for c in cheeks if c is not None]
        top = math.floor(lip_y)
        below = patch(mcx - 0.4 * mhw, mcx + 0.4 * mhw, top, top + _MAX_TEETH_SCAN * fh)
        if below is None or not found:
            return 0.0, 0.0
        skin = np.median(np.concatenate(found), axis=0)
        rows = np.median(below, axis=1)  # (rows, 3) HSV
        teeth = (rows[:, 2] >= 0.85 * skin[2]) & (rows[:, 1] <= skin[1])
        # The first rows may still be the upper lip's edge; teeth must start right below.
        near = min(teeth.size, max(4, round(0.03 * fh)))
        start = next((i for i in range(near) if teeth[i]), None)
        if start is None:
            return 0.0, 0.0
        end = start
        while end < teeth.size and teeth[end]:
            end += 1
        if end - start < 2:
            return 0.0, 0.0
        # The teeth's width a little above their lower edge: the run of teeth-like pixels
        # through the mouth's centre.
        y = top + end - 2
        row = patch(mcx - 1.2 * mhw, mcx + 1.2 * mhw, y, y)
        half_w = mhw
        if row is not None:
            px = row[0]
            like = (px[:, 2] >= 0.85 * skin[2]) & (px[:, 1] <= skin[1])
            x0 = _span(mcx - 1.2 * mhw, mcx, self._width)[0]
            c = min(max(round(mcx) - x0, 0), like.size - 1)
            lo, hi = c, c
            while lo > 0 and like[lo - 1]:
                lo -= 1
            while hi < like.size - 1 and like[hi + 1]:
                hi += 1
            if like[c]:
                half_w = 0.5 * (hi - lo + 1) + 0.1 * mhw  # the lip corner rounds past them
        return float(top + end) - lip_y, half_w

    def _setup_eyes(self) -> None:
        self._eyes: list[tuple[_Eye, _Box, np.ndarray]] = []  # eye, its box, lash colour
        margin = 0.05 * max(self._fw, self._fh) + 2.0
        rx0, ry0, rx1, ry1 = self._roi
        for cx, cy, hw, hh in (self.layout.left_eye, self.layout.right_eye):
            hw, hh = max(hw, 1.0), max(hh, 0.5)
            x0, x1 = _span(cx - hw - margin, cx + hw + margin, self._width)
            y0, y1 = _span(cy - _BROW * hh - margin, cy + 2.0 * hh + margin, self._height)
            x0, x1, y0, y1 = max(x0, rx0), min(x1, rx1), max(y0, ry0), min(y1, ry1)
            if x1 > x0 and y1 > y0:
                self._eyes.append(
                    ((cx, cy, hw, hh), (x0, y0, x1, y1), self._lash_color(cx, cy, hw, hh))
                )

    def _lash_color(self, cx: float, cy: float, hw: float, hh: float) -> np.ndarray:
        """The eye's darkest tones (lashes, pupil), for the lash line of a closed lid."""
        x0, x1 = _span(cx - hw, cx + hw, self._width)
        y0, y1 = _span(cy - 1.5 * hh, cy + hh, self._height)
        px = self.portrait[y0:y1, x0:x1].reshape(-1, 3).astype(F32)
        if px.shape[0] == 0:
            return np.array([40.0, 30.0, 28.0], F32)
        luma = px @ np.array([0.299, 0.587, 0.114], F32)
        dark = px[luma <= np.percentile(luma, 15)]
        return dark.mean(axis=0).astype(F32) if dark.size else px.mean(axis=0)

    def _setup_schedule(self) -> None:
        seed = self.seed

        # Head motion: sums of sines with incommensurate periods (s) and seeded phases;
        # the periods are also stretched per seed so two avatars never sway in lockstep.
        def waves(
            stream: int, periods: tuple[float, ...], weights: tuple[float, ...]
        ) -> tuple[tuple[float, float, float], ...]:
            stretch = 0.85 + 0.3 * _unit(seed, stream, 999)
            return tuple(
                (w, 2.0 * math.pi / (p * stretch), 2.0 * math.pi * _unit(seed, stream, k))
                for k, (p, w) in enumerate(zip(periods, weights, strict=True))
            )

        self._roll_w = waves(1, (5.3, 3.1, 1.9), (0.55, 0.30, 0.15))
        self._sx_w = waves(2, (6.7, 2.7), (0.6, 0.4))
        self._sy_w = waves(3, (4.9, 2.3), (0.6, 0.4))
        self._nod_w = waves(4, (3.7, 1.7), (0.65, 0.35))
        # Blink profile, one value per frame from the blink's first frame.
        n_close = max(1, round(_BLINK_CLOSE * self.fps))
        n_hold = max(1, round(_BLINK_HOLD * self.fps))
        n_open = max(1, round(_BLINK_OPEN * self.fps))
        close = [math.sin(0.5 * math.pi * (j + 1) / (n_close + 1)) for j in range(n_close)]
        reopen = [0.5 + 0.5 * math.cos(math.pi * (j + 1) / (n_open + 1)) for j in range(n_open)]
        self._blink_profile = [*close, *([1.0] * n_hold), *reopen]

    def _setup_strips(self) -> None:
        """Split the ROI into row strips, each resampled only where something can move.

        The head mask is an ellipse, so the ROI's corners never move; skipping them saves
        ~15 % of the resampling. Mouth and eye regions are always included.
        """
        rx0, ry0, rx1, ry1 = self._roi
        ex, ey, erx, ery = self._ellipse
        boxes = [b for b in [self._mouth_box, *(e[1] for e in self._eyes)] if b is not None]
        n = max(1, min(16, (ry1 - ry0) // 16))
        edges = np.linspace(ry0, ry1, n + 1).round().astype(int)
        self._strips: list[tuple[int, int, int, int]] = []
        for a, b in itertools.pairwise(edges.tolist()):
            if b <= a:
                continue
            # Widest extent of the ellipse's moving part over the strip's rows.
            dy = np.abs(np.arange(a, b, dtype=np.float64) - ey) / ery
            half = erx * np.sqrt(np.clip(_MASK_OUT**2 - dy**2, 0.0, None))
            lo, hi = math.floor(ex - half.max()) - 1, math.ceil(ex + half.max()) + 2
            for x0, y0, x1, y1 in boxes:
                if y0 < b and y1 > a:
                    lo, hi = min(lo, x0), max(hi, x1)
            lo, hi = max(lo, rx0), min(hi, rx1)
            if hi > lo:
                self._strips.append((int(a), int(b), lo, hi))

    # --- per-frame parameters ----------------------------------------------------------

    def blink_amount(self, frame_indices: np.ndarray) -> np.ndarray:
        """Eyelid closure in [0, 1] for each global frame index (0 = open)."""
        idx = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        return np.array([self._blink(int(i)) for i in idx], dtype=np.float64)

    def _blink(self, i: int) -> float:
        rate = self.options.blink_rate_per_min
        if not (rate > 0.0 and math.isfinite(rate)):
            return 0.0
        # One blink per slot of 60/rate seconds, starting in the middle half of its slot:
        # intervals of 0.5-1.5x the mean (2-6 s at 15/min), and frame i only has to look
        # at its own slot and the one before.
        slot = 60.0 / rate * self.fps
        k = math.floor(i / slot)
        value = 0.0
        for kk in (k - 1, k):
            start = math.floor((kk + 0.25 + 0.5 * _unit(self.seed, 7, kk)) * slot)
            j = i - start
            if 0 <= j < len(self._blink_profile):
                value = max(value, self._blink_profile[j])
        return value

    def head_pose(self, frame_index: int) -> tuple[float, float, float, float]:
        """(roll in radians, shift x px, shift y px, nod scale) at a global frame index."""
        amp = self.options.head_motion
        if amp == 0.0:
            return (0.0, 0.0, 0.0, 0.0)
        t = frame_index / self.fps

        def wave(ws: tuple[tuple[float, float, float], ...]) -> float:
            return sum(w * math.sin(om * t + ph) for w, om, ph in ws)

        return (
            amp * math.radians(_ROLL_DEG) * wave(self._roll_w),
            amp * _SHIFT_X * self._fw * wave(self._sx_w),
            amp * _SHIFT_Y * self._fh * wave(self._sy_w),
            amp * _NOD * wave(self._nod_w),
        )

    def _pose(self, frame_index: int) -> _Pose:
        roll, shx, shy, nod = self.head_pose(frame_index)
        # Forward: p' = P + R S (p - P) + t. Backward: p = P + M (p' - P - t), with
        # M = S^-1 R^-1, so the displacement is (M - I)(p' - P) - M t.
        c, s = math.cos(roll), math.sin(roll)
        k = 1.0 / (1.0 + nod)
        m00, m01, m10, m11 = c, s, -s * k, c * k
        return _Pose(
            a00=m00 - 1.0,
            a01=m01,
            a10=m10,
            a11=m11 - 1.0,
            cx=-(m00 * shx + m01 * shy),
            cy=-(m10 * shx + m11 * shy),
        )

    def _shift_at(self, pose: _Pose, px: float, py: float) -> tuple[float, float]:
        """Head displacement (source - output) at output point (px, py)."""
        ex, ey, erx, ery = self._ellipse
        rho = math.hypot((px - ex) / erx, (py - ey) / ery)
        w = 1.0 - _smooth1((rho - _MASK_IN) / (_MASK_OUT - _MASK_IN))
        dx, dy = px - self._pivot[0], py - self._pivot[1]
        return (
            w * (pose.a00 * dx + pose.a01 * dy + pose.cx),
            w * (pose.a10 * dx + pose.a11 * dy + pose.cy),
        )

    # --- rendering -----------------------------------------------------------------------

    def render(
        self,
        frame_indices: np.ndarray,
        openness: np.ndarray,
        spread: np.ndarray | None = None,
    ) -> np.ndarray:
        """Frames (B, H, W, 3) uint8 for global frame indices, per-frame openness in [0, 1]
        and per-frame lip spread in [-1, 1] (see mouth_spread; None: neutral)."""
        idx = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        amount = np.asarray(openness, dtype=np.float64).reshape(-1)
        if idx.shape != amount.shape:
            raise ValueError(f"{idx.size} frame indices but {amount.size} openness values")
        shape = np.zeros_like(amount) if spread is None else np.asarray(spread, np.float64)
        shape = shape.reshape(-1)
        if shape.shape != idx.shape:
            raise ValueError(f"{idx.size} frame indices but {shape.size} spread values")
        out = np.empty((idx.size, self._height, self._width, 3), dtype=np.uint8)
        for k in range(idx.size):
            self._render_into(out[k], int(idx[k]), float(amount[k]), float(shape[k]))
        return out

    @property
    def changed_box(self) -> _Box | None:
        """(x0, y0, x1, y1) with even corners: outside it every frame is the portrait
        (None: every frame is). Even, so that a YUV 4:2:0 conversion of the box alone gives
        the same bytes as converting whole frames (its chroma blocks never straddle it)."""
        if not self._has_roi:
            return None
        rx0, ry0, rx1, ry1 = self._roi
        return (rx0 & ~1, ry0 & ~1, min(rx1 + (rx1 & 1), self._width),
                min(ry1 + (ry1 & 1), self._height))

    def render_box(self, frame_index: int, openness: float, spread: float = 0.0) -> np.ndarray:
        """One frame inside `changed_box` only: a (y1-y0, x1-x0, 3) view of an internal
        canvas, valid until the next call, byte-identical to that part of render()'s frame.

        Only the box is reset and drawn, where render() copies the whole portrait: the
        cheaper path for a caller that keeps the static rest itself (the engine's YUV).
        """
        box = self.changed_box
        if box is None:
            raise ValueError("no part of this portrait moves (changed_box is None)")
        if self._canvas is None:
            self._canvas = self.portrait.copy()
        x0, y0, x1, y1 = box
        self._render_into(self._canvas, int(frame_index), float(openness), float(spread),
                          reset=box)
        return self._canvas[y0:y1, x0:x1]

    @property
    def opening_line(self) -> float:
        """The row the mouth opens at: the lip line, or below the upper teeth of a smile."""
        return self._mouth_c[1]

    def mouth_width(self, openness: float, spread: float) -> float:
        """The opening's half-width in pixels for one frame's openness and spread."""
        return self._mhw * self._shape(openness, spread)[1]

    def _shape(self, openness: float, spread: float) -> tuple[float, float]:
        """(lower-lip travel in px, width scale) for one frame; pure scalar arithmetic."""
        a = min(max(openness, 0.0), 1.0) if math.isfinite(openness) else 0.0
        sp = min(max(spread, -1.0), 1.0) if math.isfinite(spread) else 0.0
        wide, rnd = max(sp, 0.0), max(-sp, 0.0)
        travel = a * self._travel * (1.0 - _SPREAD_FLATTEN * wide + _ROUND_DEEPEN * rnd)
        # Barely parted lips keep their shape; the shape comes in as the mouth opens.
        ease = _smooth1(a / 0.15)
        width = 1.0 + ease * (_SPREAD_WIDEN * wide - _ROUND_NARROW * rnd)
        return travel, width

    def _render_into(self, frame: np.ndarray, i: int, openness: float, spread: float,
                     reset: _Box | None = None) -> None:
        """Draw frame i into `frame`: all of it, or with `reset` (a box holding everything
        that can move) only that box, the rest of `frame` being the portrait already."""
        travel, width = self._shape(openness, spread)
        mouth = travel >= 0.02 and self._mouth_box is not None
        blink = self._blink(i)
        pose = self._pose(i)
        # The static parts (one straight copy beats many strided pieces); when nothing
        # moves, the frame is the portrait itself.
        if reset is None:
            frame[...] = self.portrait
        else:
            x0, y0, x1, y1 = reset
            frame[y0:y1, x0:x1] = self.portrait[y0:y1, x0:x1]
        if not self._has_roi or (pose.still and not mouth and blink <= 0.0):
            return
        mouth_shift = self._shift_at(pose, *self._mouth_c)
        self._coarse_map(pose, travel if mouth else 0.0, mouth_shift, width)
        band = self._mouth_band(pose, travel, mouth_shift, width) if mouth else None
        lids: list[tuple[_Eye, _Box, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        if blink > 0.0:
            for eye, box, lash in self._eyes:
                edge = self._eye_map(blink, eye, box, self._shift_at(pose, eye[0], eye[1]))
                lids.append((eye, box, lash, *edge))
        rx0, ry0 = self._roi[0], self._roi[1]
        for a, b, lo, hi in self._strips:
            cv2.remap(
                self.portrait,
                self._mapx[a - ry0 : b - ry0, lo - rx0 : hi - rx0],
                self._mapy[a - ry0 : b - ry0, lo - rx0 : hi - rx0],
                cv2.INTER_LINEAR,
                dst=frame[a:b, lo:hi],
                borderMode=cv2.BORDER_REPLICATE,
            )
        if band is not None:
            self._paint_mouth(frame, *band, width)
        for lid in lids:
            self._paint_lashes(frame, *lid)

    def _coarse_map(
        self, pose: _Pose, travel: float, shift: tuple[float, float], width: float
    ) -> None:
        """Smooth map on the coarse grid (head + jaw), upsampled into the map buffers."""
        lx, ly, tmp = self._lowx, self._lowy, self._tmp
        np.multiply(self._cmx, F32(pose.a00), out=lx)
        lx += self._cx_abs
        np.multiply(self._cmy, F32(pose.a01), out=tmp)
        lx += tmp
        np.multiply(self._cm, F32(pose.cx), out=tmp)
        lx += tmp
        np.multiply(self._cmx, F32(pose.a10), out=ly)
        ly += self._cy_abs
        np.multiply(self._cmy, F32(pose.a11), out=tmp)
        ly += tmp
        np.multiply(self._cm, F32(pose.cy), out=tmp)
        ly += tmp
        if travel > 0.0 and self._mouth_cells is not None:
            i0, i1, j0, j1 = self._mouth_cells
            ys, xs = self._coarse_ys[i0:i1], self._coarse_xs[j0:j1]
            dy, dx = self._mouth_smooth(travel, shift, ys, xs, width)
            ly[i0:i1, j0:j1] += dy
            if dx is not None:
                lx[i0:i1, j0:j1] += dx
        cv2.resize(lx, self._bufx.shape[::-1], dst=self._bufx, interpolation=cv2.INTER_LINEAR)
        cv2.resize(ly, self._bufy.shape[::-1], dst=self._bufy, interpolation=cv2.INTER_LINEAR)

    def _lip_profile(self, dx: np.ndarray, inv_w2: float | np.ndarray) -> np.ndarray:
        # (1 - (dx/w)^2)^1.5: 1 at the centre, 0 with zero slope at +-w (no crease), and
        # full enough in between for a mouth-shaped (not needle-tipped) opening.
        u = np.multiply.outer(inv_w2, dx * dx) if isinstance(inv_w2, np.ndarray) else dx * dx
        if not isinstance(inv_w2, np.ndarray):
            u *= inv_w2
        np.subtract(1.0, u, out=u)
        np.maximum(u, 0.0, out=u)
        u *= np.sqrt(u)
        return u

    def _mouth_smooth(
        self,
        travel: float,
        shift: tuple[float, float],
        ys: np.ndarray,
        xs: np.ndarray,
        width: float,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Source shift (y, x) of the lips and jaw without the lip-gap clamp (coarse grid).

        s is the distance below the lip line and dx from the mouth centre in the head's
        frame: the head's shift at the mouth is applied; its roll moves the lips by well
        under a pixel over the mouth and is ignored. The x shift narrows (rounded) or
        widens (spread) the lips about the mouth centre, fading out around them.
        """
        s = ys + (shift[1] - self._mouth_c[1])
        dx = xs + (shift[0] - self._mouth_c[0])
        s_tab = self._s_tab
        inv_w2 = 1.0 / (width * width)
        lift = np.interp(s, s_tab, self._lift_tab) * travel
        drop = np.interp(s, s_tab, self._drop_tab) * travel
        upper = np.multiply.outer(lift, self._lip_profile(dx, inv_w2 / self._mhw**2))
        lower = self._lip_profile(dx, np.interp(s, s_tab, self._inv_w2_tab) * inv_w2)
        lower *= drop[:, None]
        upper -= lower
        if width == 1.0:
            return upper.astype(F32), None
        fh, mhw = self._fh, self._mhw
        # Distance outside the lips: above the lip line, or below the dropped lower lip.
        out_s = np.where(s < 0.0, -s, np.maximum(s - travel, 0.0))
        gs = 1.0 - _smoothstep((out_s - _SQUEEZE_LIPS * fh) / (_SQUEEZE_FADE * fh))
        gx = 1.0 - _smoothstep((np.abs(dx) - 0.7 * mhw) / (0.9 * mhw))
        sideways = np.multiply.outer(gs, (1.0 / width - 1.0) * dx * gx)
        return upper.astype(F32), sideways.astype(F32)

    def _mouth_band(
        self, pose: _Pose, travel: float, shift: tuple[float, float], width: float
    ) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Exact map rows around the lip line; returns what _paint_mouth needs."""
        assert self._mouth_box is not None
        x0, y0, x1, y1 = self._mouth_box
        mcx, lip = self._mouth_c
        lip_y = lip - shift[1]  # where the lip line lands in the output
        half_w = self._mhw * width
        by0, by1 = _span(lip_y - self._band_up, lip_y + self._band_down, self._height)
        bx0, bx1 = _span(
            mcx - shift[0] - half_w - _K - 1.0,
            mcx - shift[0] + half_w + _K + 1.0,
            self._width,
        )
        by0, by1, bx0, bx1 = max(by0, y0), min(by1, y1), max(bx0, x0), min(bx1, x1)
        if by1 <= by0 or bx1 <= bx0:
            return None
        ys, xs = self._rows_f[by0:by1], self._cols_f[bx0:bx1]
        # Exact head map here (the coarse one mixes values across the lip line), and each
        # pixel's place in the head's frame: s below the lip line, dx from the mouth
        # centre (so the opening follows the head's roll, too).
        px, py = self._pivot
        qy = np.add.outer(pose.a11 * (ys - py), pose.a10 * (xs - px) + pose.cy)
        qx = np.add.outer(pose.a01 * (ys - py), pose.a00 * (xs - px) + pose.cx)
        if self._mouth_mask is not None:
            m = self._mouth_mask[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0]
            qy *= m
            qx *= m
        qy += ys[:, None]
        qx += xs
        s = qy - lip
        f = self._lip_profile(qx - mcx, 1.0 / half_w**2)
        lift = f * (self._up_share * travel)  # gap top, above the lip line
        drop = f * travel  # gap bottom, below the lip line
        # Rows above the line sample lower (the upper lip rises), rows below sample higher
        # (the jaw drops), but never across the lip line: the gap samples the line itself
        # and is painted over afterwards.
        qy += np.minimum(np.maximum(-s, 0.0), lift)
        qy -= np.minimum(np.maximum(s, 0.0), drop)
        rx0, ry0 = self._roi[0], self._roi[1]
        self._mapy[by0 - ry0 : by1 - ry0, bx0 - rx0 : bx1 - rx0] = qy
        return by0, bx0, s, qx - mcx, lift, drop

    def _paint_mouth(
        self,
        frame: np.ndarray,
        y0: int,
        x0: int,
        s: np.ndarray,
        dx: np.ndarray,
        lift: np.ndarray,
        drop: np.ndarray,
        width: float,
    ) -> None:
        """Paint the mouth interior into the lip gap [-lift, drop], anti-aliased.

        All arrays are per band pixel: s and dx place it in the head's frame, lift and drop
        are the gap's extent above and below the lip line there. The interior is darkest at
        the back (the middle of the opening) and lighter towards the lips, in the shadow of
        the upper teeth at the top; a wide opening shows a hint of tongue and lower teeth.
        """
        open_cols = np.flatnonzero(drop.max(axis=0) > 0.0)  # only where the gap is open
        if open_cols.size == 0:
            return
        c0, c1 = int(open_cols[0]), int(open_cols[-1]) + 1
        # Coverage of the feathered pixel [s - f/2, s + f/2] by the gap [-lift, drop]:
        # exactly zero wherever the gap has no height, so nothing is drawn past the lip
        # corners.
        s, dx, lift, drop = s[:, c0:c1], dx[:, c0:c1], lift[:, c0:c1], drop[:, c0:c1]
        half = 0.5 * self._feather
        cover = np.minimum(s + half, drop)
        cover -= np.maximum(s - half, -lift)
        cover *= 1.0 / self._feather
        np.clip(cover, 0.0, 1.0, out=cover)
        rows = np.flatnonzero(cover.max(axis=1) > 0.0)
        if rows.size == 0:
            return
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        cover, s, dx = cover[r0:r1], s[r0:r1], dx[r0:r1]
        lift, drop = lift[r0:r1], drop[r0:r1]
        gap = drop + lift
        depth = s + lift
        depth /= np.maximum(gap, 1e-3)
        np.clip(depth, 0.0, 1.0, out=depth)
        hx = np.abs(dx) * (1.0 / (self._mhw * width))
        # Lit towards the lips (the sides and the lower lip), dark at the back.
        r2 = hx * hx
        r2 += ((depth - 0.4) * (1.0 / 0.6)) ** 2
        lit = _smoothstep((r2 - 0.2) * (1.0 / 0.8))
        lit *= 0.85
        # The upper teeth (or lip) shade the top of the opening.
        lit *= _smoothstep(depth * 4.0)
        cavity, inner_lip, tongue_rgb, teeth_rgb = self._palette
        color = np.multiply.outer(lit, inner_lip - cavity)
        color += cavity
        # Tongue low in the middle, lower teeth just above the lower lip: only in a wide
        # opening, and only a hint.
        wide = np.clip((gap - 6.0) * (1.0 / 14.0), 0.0, 1.0)
        tongue = _smoothstep((depth - 0.55) * (1.0 / 0.3))
        tongue *= np.maximum(1.0 - hx * hx * 1.6, 0.0)
        tongue *= wide * 0.55
        color += tongue[..., None] * (tongue_rgb - color)
        lower = _smoothstep((depth - 0.7) * 8.0) * (1.0 - _smoothstep((depth - 0.86) * 12.0))
        lower *= np.maximum(1.0 - (hx * (1.0 / 0.6)) ** 2, 0.0)
        lower *= wide * 0.35
        color += lower[..., None] * (0.8 * teeth_rgb - color)
        if self._paint_teeth:
            self._paint_teeth_band(color, s, dx, lift, gap)
        region = frame[y0 + r0 : y0 + r1, x0 + c0 : x0 + c1]
        base = region.astype(np.float64)
        color -= base
        color *= cover[..., None]
        color += base
        color += 0.5
        np.clip(color, 0.0, 255.0, out=color)
        region[...] = color.astype(np.uint8)

    def _paint_teeth_band(
        self,
        color: np.ndarray,
        s: np.ndarray,
        dx: np.ndarray,
        lift: np.ndarray,
        gap: np.ndarray,
    ) -> None:
        """Upper teeth: a light band hanging from the upper lip, narrower than the mouth,
        shaded towards the sides, in the lip's shadow at the very top."""
        shape = np.maximum(1.0 - (dx * (1.0 / (0.75 * self._mhw))) ** 2, 0.0)
        height = np.minimum(0.3 * gap, 0.04 * self._fh) * shape
        inside = s + lift
        inside /= np.maximum(height, 1e-3)
        np.clip(inside, 0.0, 1.0, out=inside)
        teeth = 1.0 - _smoothstep((inside - 0.6) * 2.5)
        teeth *= _smoothstep(inside * 4.0)
        teeth *= 0.9 * _smoothstep((gap - 3.0) * 0.125) * np.sqrt(shape)
        shade = np.multiply.outer(0.6 + 0.4 * shape, self._palette[3]) - color
        shade *= teeth[..., None]
        color += shade

    def _eye_map(
        self,
        blink: float,
        eye: _Eye,
        box: _Box,
        shift: tuple[float, float],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add one blink to the map: the lid skin slides down over the eye opening.

        Returns (rows, lid edge, relative opening) in the eye's frame for the lashes."""
        cx, cy, hw, hh = eye
        x0, y0, x1, y1 = box
        dy = (np.arange(y0, y1, dtype=np.float64) + shift[1] - cy).astype(F32)[:, None]
        dx = np.arange(x0, x1, dtype=np.float64) + shift[0] - cx
        # Opening half-height across the eye (a full almond, so the corners close too; a
        # little wider than the detected eye), and the lid edge's position now: from the
        # upper lid line (-h) down to just past the lower one.
        u2 = (dx / (_LID_WIDEN * hw)) ** 2
        h = hh * np.clip(1.0 - u2 * u2, 0.0, None)
        travel = (_LID_OVERSHOOT * 2.0 * blink) * h
        edge = (travel - h).astype(F32)[None, :]
        brow = F32(-_BROW * hh)
        # Skin between the brow and the lid edge slides down, most at the edge (smoothstep:
        # the brow stays still and the lash line crisp); below the edge nothing moves.
        ramp = _smoothstep((dy - brow) / np.maximum(edge - brow, F32(1e-3)))
        ramp *= np.clip(edge - dy + F32(0.5), 0.0, 1.0)
        ramp *= travel.astype(F32)[None, :]
        rx0, ry0 = self._roi[0], self._roi[1]
        self._mapy[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] -= ramp
        return dy, edge, (h / hh).astype(F32)[None, :]

    def _paint_lashes(
        self,
        frame: np.ndarray,
        eye: _Eye,
        box: _Box,
        lash: np.ndarray,
        dy: np.ndarray,
        edge: np.ndarray,
        opening: np.ndarray,
    ) -> None:
        """Draw the lash line along the moving lid edge.

        The map jumps at the edge (lid above, eye below), and bilinear sampling across a
        jump shows a one-pixel fringe of eye white; a soft dark line hides it and reads as
        the lashes of a closing lid.
        """
        hh = eye[3]
        thick = F32(max(0.8, 0.16 * hh))
        # Coverage of pixel [dy - 0.5, dy + 0.5] by the line [edge - thick, edge + 0.5],
        # thinning out towards the eye corners.
        cover = np.minimum(dy + F32(0.5), edge + F32(0.5)) - np.maximum(dy - F32(0.5), edge - thick)
        np.clip(cover, 0.0, 1.0, out=cover)
        cover *= np.clip(opening * F32(1.5), 0.0, 1.0) * F32(0.6)
        rows = np.flatnonzero(cover.max(axis=1) > 0.0)
        if rows.size == 0:
            return
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        x0, y0, x1, _ = box
        region = frame[y0 + r0 : y0 + r1, x0:x1]
        base = region.astype(F32)
        base += cover[r0:r1, :, None] * (lash - base)
        base += F32(0.5)
        region[...] = np.clip(base, 0.0, 255.0).astype(np.uint8)
