"""Find the face, eyes and mouth in a portrait (OpenCV Haar cascades, no torch).

The built-in animator only needs a rough layout: where the face is, where each eye
opening is and where the lips meet. Haar cascades give that in a few milliseconds on a
CPU; every feature they miss (or get wrong) is filled in from typical face proportions,
so a layout is always complete and always plausible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

Box = tuple[float, float, float, float]
Mouth = tuple[float, float, float]

# Typical proportions relative to a Haar frontal-face box (x, y, w, h): the box runs
# from about the eyebrows to just below the mouth, so the chin lies slightly outside it.
_EYE_X = 0.30  # eye centre, share of the box width from its near side
_EYE_Y = 0.38  # eye centre, share of the box height from the top
_EYE_HW = 0.095  # half-width of the visible eye opening / box width
_EYE_HH = 0.033  # half-height of the eye opening / box width
_MOUTH_Y = 0.81  # line where the lips meet / box height
_MOUTH_HW = 0.17  # mouth half-width / box width; narrow-ish, so an opening stays inside

# Search for the face in a copy no larger than this (longest side): Haar cost grows with
# the pixel count, and a portrait's face (>= 15 % of the shorter side) stays >= 38 px.
_DETECT_MAX_SIDE = 256
# Eyes and mouth are searched in the face box resampled to this width.
_FACE_CANON = 120

_SOURCES = ("detected", "geometry", "fallback", "user")


@dataclass(frozen=True)
class FaceLayout:
    """Face features in pixels of the image they were found in.

    ``left_eye`` is the eye on the image's left (the subject's right eye).
    """

    face: Box  # (x, y, w, h) of the face box
    left_eye: Box  # (cx, cy, half_width, half_height) of the visible eye opening
    right_eye: Box  # same, for the eye on the image's right
    mouth: Mouth  # (cx, cy, half_width); cy is the line where the lips meet
    source: str  # "detected", "geometry", "fallback" or "user"

    def __post_init__(self) -> None:
        # Store plain Python floats (numpy scalars would leak into JSON and reprs).
        for name, n in (("face", 4), ("left_eye", 4), ("right_eye", 4), ("mouth", 3)):
            object.__setattr__(self, name, tuple(_floats(getattr(self, name), n)))
        if self.source not in _SOURCES:
            raise ValueError(f"unknown face layout source {self.source!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists of floats), for a job manifest."""
        return {
            "face": [float(v) for v in self.face],
            "left_eye": [float(v) for v in self.left_eye],
            "right_eye": [float(v) for v in self.right_eye],
            "mouth": [float(v) for v in self.mouth],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaceLayout:
        """Inverse of :meth:`to_dict`; raises ValueError on a malformed mapping."""
        try:
            face = _floats(data["face"], 4)
            left = _floats(data["left_eye"], 4)
            right = _floats(data["right_eye"], 4)
            mouth = _floats(data["mouth"], 3)
            source = str(data.get("source", "user"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed face layout: {exc}") from exc
        return cls(
            face=(face[0], face[1], face[2], face[3]),
            left_eye=(left[0], left[1], left[2], left[3]),
            right_eye=(right[0], right[1], right[2], right[3]),
            mouth=(mouth[0], mouth[1], mouth[2]),
            source=source,
        )

    def scaled(self, sx: float, sy: float) -> FaceLayout:
        """The same layout in an image resized by (sx, sy)."""
        x, y, w, h = self.face
        lx, ly, lw, lh = self.left_eye
        rx, ry, rw, rh = self.right_eye
        mx, my, mw = self.mouth
        return FaceLayout(
            face=(x * sx, y * sy, w * sx, h * sy),
            left_eye=(lx * sx, ly * sy, lw * sx, lh * sy),
            right_eye=(rx * sx, ry * sy, rw * sx, rh * sy),
            mouth=(mx * sx, my * sy, mw * sx),
            source=self.source,
        )


def _floats(values: Any, n: int) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"expected {n} finite numbers, got {values!r}")
    return out


# --- geometry -------------------------------------------------------------------------


def _geometry_eyes(x: float, y: float, w: float, h: float) -> tuple[Box, Box]:
    hw, hh = _EYE_HW * w, _EYE_HH * w
    cy = y + _EYE_Y * h
    return (x + _EYE_X * w, cy, hw, hh), (x + (1.0 - _EYE_X) * w, cy, hw, hh)


def _geometry_mouth(x: float, y: float, w: float, h: float) -> Mouth:
    return (x + 0.5 * w, y + _MOUTH_Y * h, _MOUTH_HW * w)


def layout_from_box(x: float, y: float, w: float, h: float, *, source: str = "user") -> FaceLayout:
    """A layout from a face box alone (e.g. ``--face X,Y,W,H``), from typical proportions."""
    return _box_layout(float(x), float(y), max(float(w), 1.0), max(float(h), 1.0), source)


def _box_layout(x: float, y: float, w: float, h: float, source: str) -> FaceLayout:
    left, right = _geometry_eyes(x, y, w, h)
    return FaceLayout(
        face=(x, y, w, h),
        left_eye=left,
        right_eye=right,
        mouth=_geometry_mouth(x, y, w, h),
        source=source,
    )


def fallback_layout(width: int, height: int) -> FaceLayout:
    """A plausible centred face for portraits where no face is found."""
    width = max(int(width), 1)
    height = max(int(height), 1)
    # A head-and-shoulders framing: the face box spans ~45 % of the shorter side,
    # centred horizontally and a little above the middle.
    side = 0.45 * min(width, height)
    x = 0.5 * (width - side)
    y = max(0.0, 0.42 * height - 0.5 * side)
    return _box_layout(x, y, side, side, "fallback")


# --- detection ------------------------------------------------------------------------


@functools.cache
def _cascade(name: str) -> cv2.CascadeClassifier:
    # Loading a cascade parses a large XML file; do it once per process.
    path = str(cv2.data.haarcascades) + name  # type: ignore[attr-defined]
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV Haar cascade missing: {path}")
    return cascade


def _to_gray(rgb: np.ndarray) -> np.ndarray:
    img = np.asarray(rgb)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.ascontiguousarray(img)
    if img.ndim == 3 and img.shape[2] == 3:
        return np.asarray(cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY))
    if img.ndim == 3 and img.shape[2] == 1:
        return np.ascontiguousarray(img[:, :, 0])
    raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")


def _detect_face(gray: np.ndarray) -> Box | None:
    h, w = gray.shape
    scale = min(1.0, _DETECT_MAX_SIDE / max(h, w))
    small = gray
    if scale < 1.0:
        small = cv2.resize(
            gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    small = cv2.equalizeHist(small)
    side = max(24, int(0.15 * min(small.shape)))
    if min(small.shape) < side:
        return None
    for name in ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml"):
        rects, _, weights = _cascade(name).detectMultiScale3(
            small, scaleFactor=1.1, minNeighbors=5, minSize=(side, side), outputRejectLevels=True
        )
        if len(rects) == 0:
            continue
        conf = np.asarray(weights, np.float64).reshape(-1)
        # Largest face among the confident ones: a weak big hit (a helmet, a flag) must
        # not beat a clear face.
        keep = [i for i in range(len(rects)) if conf[i] >= 0.3 * conf.max()] or [
            int(np.argmax(conf))
        ]
        best = max(keep, key=lambda i: float(rects[i][2]) * float(rects[i][3]))
        bx, by, bw, bh = (float(v) for v in rects[best])
        return (bx / scale, by / scale, bw / scale, bh / scale)
    return None


def _detect_eyes(face: np.ndarray) -> tuple[Box | None, Box | None]:
    """Eyes in the canonical face crop, as fractions of the crop; None where not found."""
    n = face.shape[0]
    upper = face[: int(0.58 * n)]
    found = _cascade("haarcascade_eye.xml").detectMultiScale(
        upper, scaleFactor=1.1, minNeighbors=3, minSize=(12, 12), maxSize=(54, 54)
    )
    # The eye opening sits centred in a Haar eye box and spans ~0.41 x 0.13 of its size.
    cands: list[Box] = []
    for ex, ey, ew, eh in found:
        cx, cy, size = (ex + 0.5 * ew) / n, (ey + 0.5 * eh) / n, float(ew) / n
        if 0.12 <= cx <= 0.88 and 0.22 <= cy <= 0.55 and 0.12 <= size <= 0.45:
            cands.append((cx, cy, 0.41 * size, 0.13 * size))
    best: tuple[float, Box, Box] | None = None
    for a in cands:
        for b in cands:
            dist = b[0] - a[0]
            # A real pair: roughly level, 28-62 % of the face apart, one on each side.
            if not (0.28 <= dist <= 0.62) or abs(a[1] - b[1]) > 0.12:
                continue
            if a[0] > 0.5 or b[0] < 0.5:
                continue
            # Prefer the pair closest to the typical spot (eyebrows and nostrils also fire).
            err = abs(a[1] - _EYE_Y) + abs(b[1] - _EYE_Y) + abs(dist - 0.4)
            if best is None or err < best[0]:
                best = (err, a, b)
    if best is not None:
        return best[1], best[2]
    # A single plausible eye still pins the eye line; the other side comes from geometry.
    left = [c for c in cands if c[0] < 0.45 and abs(c[1] - _EYE_Y) < 0.12]
    right = [c for c in cands if c[0] > 0.55 and abs(c[1] - _EYE_Y) < 0.12]
    if len(left) == 1 and not right:
        return left[0], None
    if len(right) == 1 and not left:
        return None, right[0]
    return None, None


def _detect_mouth(face: np.ndarray) -> Mouth | None:
    """Mouth from the smile cascade in the lower part, as fractions of the crop, or None."""
    n = face.shape[0]
    top = int(0.55 * n)
    found = _cascade("haarcascade_smile.xml").detectMultiScale(
        face[top:], scaleFactor=1.1, minNeighbors=12, minSize=(int(0.25 * n), int(0.12 * n))
    )
    best: tuple[float, Mouth] | None = None
    for sx, sy, sw, sh in found:
        cx = (sx + 0.5 * sw) / n
        cy = (top + sy + 0.62 * sh) / n  # smile boxes sit a little above the lip line
        width = float(sw) / n
        if 0.38 <= cx <= 0.62 and 0.68 <= cy <= 0.95 and 0.3 <= width <= 0.8:
            err = abs(cx - 0.5) + abs(cy - _MOUTH_Y)
            if best is None or err < best[0]:
                best = (err, (cx, cy, min(0.35 * width, 0.22)))
    return None if best is None else best[1]


def _refine_lip_line(gray: np.ndarray, mouth: Mouth, face_h: float) -> Mouth:
    """Snap the lip line to the darkest row near the estimate (lips meet in a dark line)."""
    cx, cy, hw = mouth
    h, w = gray.shape
    reach = 0.06 * face_h
    x0, x1 = int(max(0, cx - 0.45 * hw)), int(min(w, cx + 0.45 * hw + 1))
    y0, y1 = int(max(0, cy - reach)), int(min(h, cy + reach + 1))
    if x1 - x0 < 3 or y1 - y0 < 5:
        return mouth
    rows = gray[y0:y1, x0:x1].astype(np.float32).mean(axis=1)
    rows = np.convolve(rows, np.ones(3, np.float32) / 3.0, mode="valid")
    i = int(np.argmin(rows))
    # Only trust a clearly dark line; an evenly lit region would just give noise.
    if float(np.median(rows)) - float(rows[i]) < 12.0:
        return mouth
    return (cx, float(y0 + 1 + i), hw)


def find_face(rgb: np.ndarray) -> FaceLayout | None:
    """Detect the largest frontal face and its features; None when there is no face."""
    gray = _to_gray(rgb)
    if gray.shape[0] < 24 or gray.shape[1] < 24:
        return None
    box = _detect_face(gray)
    if box is None:
        return None
    x, y, w, h = box
    img_h, img_w = gray.shape
    x0, y0 = int(max(0.0, round(x))), int(max(0.0, round(y)))
    x1, y1 = int(min(img_w, round(x + w))), int(min(img_h, round(y + h)))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return _box_layout(x, y, w, h, "geometry")
    cw, ch = float(x1 - x0), float(y1 - y0)
    # Features are searched in the face box resampled to a fixed size: scale-free and fast.
    face = cv2.equalizeHist(
        cv2.resize(gray[y0:y1, x0:x1], (_FACE_CANON, _FACE_CANON), interpolation=cv2.INTER_AREA)
    )
    geo_left, geo_right = _geometry_eyes(x, y, w, h)
    left, right = _detect_eyes(face)

    def place(eye: Box | None, geo: Box, other: Box | None) -> Box:
        if eye is not None:
            return (x0 + eye[0] * cw, y0 + eye[1] * ch, eye[2] * cw, eye[3] * cw)
        if other is not None:  # only the other eye was found: keep the eyes level
            return (geo[0], y0 + other[1] * ch, other[2] * cw, other[3] * cw)
        return geo

    left_eye = place(left, geo_left, right)
    right_eye = place(right, geo_right, left)
    found_mouth = _detect_mouth(face)
    mouth = (
        (x0 + found_mouth[0] * cw, y0 + found_mouth[1] * ch, found_mouth[2] * cw)
        if found_mouth is not None
        else _geometry_mouth(x, y, w, h)
    )
    mouth = _refine_lip_line(gray, mouth, h)
    # The mouth must sit well below the eyes and between them.
    eye_y = 0.5 * (left_eye[1] + right_eye[1])
    if not (eye_y + 0.25 * h < mouth[1] < y + 1.05 * h and left_eye[0] < mouth[0] < right_eye[0]):
        mouth = _geometry_mouth(x, y, w, h)
    return FaceLayout(
        face=(x, y, w, h),
        left_eye=left_eye,
        right_eye=right_eye,
        mouth=mouth,
        # "geometry": the face box is real but the eyes are only estimated.
        source="detected" if (left is not None or right is not None) else "geometry",
    )
