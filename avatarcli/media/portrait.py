"""Loading the portrait and fitting it to the output frame."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from avatarcli.errors import InputError

MIN_SIDE = 64  # px: below this there is no face to animate


def load(path: Path) -> np.ndarray:
    """The portrait as uint8 RGB (H, W, 3), EXIF rotation applied, alpha flattened on white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. truncated EXIF
            # More pixels than Pillow's bound (about 89 megapixels) is a decompression bomb,
            # not a portrait: refused before anything is decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                rgb = _flatten(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: image is too large to be a portrait "
                         f"(at most {Image.MAX_IMAGE_PIXELS} pixels): {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        rgb = _load_cv2(path)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InputError(f"{path}: image is {w}x{h} px; it needs at least {MIN_SIDE} px per side")
    return rgb


def _flatten(im: object) -> np.ndarray:
    from PIL import Image

    assert isinstance(im, Image.Image)
    im = _to_8bit(im)
    assert isinstance(im, Image.Image)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _to_8bit(im: object) -> object:
    """Deep images (16-bit grey `I;16*`, 32-bit `I`, float `F`) scaled to 8 bits per channel.

    Pillow's own conversion to RGB clips them (every value above 255 turns white)."""
    from PIL import Image

    assert isinstance(im, Image.Image)
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
        a = a / 257.0  # 0..65535 -> 0..255
    elif im.mode == "F" and a.size and a.max() <= 1.0:
        a = a * 255.0  # floating point images in [0, 1]
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _load_cv2(path: Path) -> np.ndarray:
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else np.zeros(0, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise InputError(f"{path}: not an image Pillow or OpenCV can read")
    if img.dtype == np.uint16:  # 48-bit colour: scale, never clip
        img = np.rint(img / 257.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img[:, :, ::-1])


def output_size(area_key: tuple[int, int], aspect: float, multiple: int = 16) -> tuple[int, int]:
    """(width, height) with the portrait's aspect ratio, multiples of `multiple`, within the area."""
    area = area_key[0] * area_key[1]
    w = max(multiple, math.floor(math.sqrt(area * aspect) / multiple) * multiple)
    h = max(multiple, math.floor(math.sqrt(area / aspect) / multiple) * multiple)
    while w * h > area and (w > multiple or h > multiple):
        if w >= h:
            w -= multiple
        else:
            h -= multiple
    return w, h


def fit_transform(src_w: int, src_h: int, width: int, height: int) -> tuple[float, int, int, int, int]:
    """(scale, scaled_w, scaled_h, left, top) of scaling to cover, then centre-cropping."""
    scale = max(width / src_w, height / src_h)
    nw, nh = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    return scale, nw, nh, (nw - width) // 2, (nh - height) // 2


def map_box(box: tuple[int, int, int, int], src_w: int, src_h: int, width: int,
            height: int) -> tuple[int, int, int, int]:
    """A box in the original image's pixels, in the fitted frame's pixels."""
    scale, _, _, left, top = fit_transform(src_w, src_h, width, height)
    x, y, w, h = box
    return round(x * scale - left), round(y * scale - top), round(w * scale), round(h * scale)


def fit(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to cover (width, height), then centre-crop: no bars, no distortion."""
    from PIL import Image

    h, w = rgb.shape[:2]
    _, nw, nh, left, top = fit_transform(w, h, width, height)
    im = Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(im.crop((left, top, left + width, top + height))))
