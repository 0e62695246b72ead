"""Face layout detection for the built-in engine (OpenCV Haar cascades)."""

from __future__ import annotations

import json

import cv2
import fixtures
import numpy as np
import pytest

from avatarcli.engines.builtin.face import (
    FaceLayout,
    fallback_layout,
    find_face,
    layout_from_box,
)

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(skdata.astronaut())


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """A 512x512 head-and-shoulders crop around the astronaut's face."""
    return fixtures.astronaut_head()


def _inside(px: float, py: float, box: tuple[float, float, float, float]) -> bool:
    x, y, w, h = box
    return x <= px <= x + w and y <= py <= y + h


def _check_plausible(layout: FaceLayout) -> None:
    x, y, w, h = layout.face
    left, right, mouth = layout.left_eye, layout.right_eye, layout.mouth
    for eye in (left, right):
        assert _inside(eye[0], eye[1], layout.face)
        assert eye[1] < y + 0.55 * h  # eyes in the upper half
        assert 0.03 * w < eye[2] < 0.2 * w and 0 < eye[3] < eye[2]
    assert left[0] < x + 0.5 * w < right[0]
    assert abs(left[1] - right[1]) < 0.1 * h  # roughly level
    assert 0.25 * w < right[0] - left[0] < 0.65 * w
    assert _inside(mouth[0], mouth[1], layout.face)
    assert mouth[1] > max(left[1], right[1]) + 0.25 * h
    assert left[0] < mouth[0] < right[0]
    assert 0.1 * w < mouth[2] < 0.35 * w


def test_finds_astronaut_face(astronaut: np.ndarray) -> None:
    layout = find_face(astronaut)
    assert layout is not None
    assert layout.source == "detected"
    _check_plausible(layout)
    x, y, w, h = layout.face
    # The face is in the upper-left area, around (225, 115), ~100 px wide.
    assert abs(x + w / 2 - 225) < 25 and abs(y + h / 2 - 115) < 25
    assert 70 < w < 140


def test_finds_portrait_features(portrait: np.ndarray) -> None:
    layout = find_face(portrait)
    assert layout is not None
    _check_plausible(layout)
    # Hand-measured on this crop: eyes at ~(211, 199) and (303, 203), lips at y ~283-291.
    assert abs(layout.left_eye[0] - 211) < 10 and abs(layout.left_eye[1] - 199) < 10
    assert abs(layout.right_eye[0] - 303) < 10 and abs(layout.right_eye[1] - 203) < 10
    assert abs(layout.mouth[0] - 255) < 10 and 275 < layout.mouth[1] < 298


def test_grey_looking_photo(astronaut: np.ndarray) -> None:
    grey = cv2.cvtColor(cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    layout = find_face(grey)
    assert layout is not None
    _check_plausible(layout)


@pytest.mark.parametrize(
    "image",
    [
        np.full((256, 256, 3), 128, np.uint8),
        np.zeros((512, 512, 3), np.uint8),
        np.full((300, 200, 3), 255, np.uint8),
        np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8),
        np.zeros((16, 16, 3), np.uint8),
        np.zeros((64, 64, 3), np.uint8),
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((2000, 3000, 3), np.uint8),
        np.zeros((128, 128), np.uint8),  # single-channel input is accepted too
    ],
    ids=["flat", "black", "white", "noise", "tiny", "64", "1px", "huge", "gray2d"],
)
def test_no_face(image: np.ndarray) -> None:
    assert find_face(image) is None


def test_rejects_bad_shape() -> None:
    with pytest.raises(ValueError):
        find_face(np.zeros((32, 32, 2), np.uint8))


def _check_in_image(layout: FaceLayout, width: int, height: int) -> None:
    for px, py in (
        layout.left_eye[:2],
        layout.right_eye[:2],
        layout.mouth[:2],
        (layout.face[0], layout.face[1]),
        (layout.face[0] + layout.face[2], layout.face[1] + layout.face[3]),
    ):
        assert 0 <= px <= width and 0 <= py <= height


@pytest.mark.parametrize(
    "size", [(64, 64), (384, 640), (640, 384), (512, 512), (1, 1), (4000, 3000)]
)
def test_fallback_layout_inside_image(size: tuple[int, int]) -> None:
    width, height = size
    layout = fallback_layout(width, height)
    assert layout.source == "fallback"
    _check_in_image(layout, width, height)
    assert layout.left_eye[0] < layout.mouth[0] < layout.right_eye[0]
    assert layout.left_eye[1] < layout.mouth[1]


def test_layout_from_box() -> None:
    layout = layout_from_box(100, 50, 200, 220)
    assert layout.source == "user"
    assert layout.face == (100.0, 50.0, 200.0, 220.0)
    _check_plausible(layout)
    _check_in_image(layout, 400, 400)
    # Degenerate boxes still give a usable layout.
    tiny = layout_from_box(5, 5, 0, -3)
    assert tiny.face[2] >= 1 and tiny.face[3] >= 1


def test_dict_round_trip(portrait: np.ndarray) -> None:
    layout = find_face(portrait)
    assert layout is not None
    data = json.loads(json.dumps(layout.to_dict()))
    assert FaceLayout.from_dict(data) == layout
    assert all(isinstance(v, float) for v in layout.face + layout.mouth)
    fb = fallback_layout(300, 200)
    assert FaceLayout.from_dict(fb.to_dict()) == fb


@pytest.mark.parametrize(
    "data",
    [
        {},
        {
            "face": [1, 2, 3],
            "left_eye": [1, 2, 3, 4],
            "right_eye": [1, 2, 3, 4],
            "mouth": [1, 2, 3],
        },
        {
            "face": [1, 2, 3, 4],
            "left_eye": [1, 2, 3, 4],
            "right_eye": [1, 2, 3, 4],
            "mouth": [1, 2, "x"],
        },
        {
            "face": [1, 2, 3, float("nan")],
            "left_eye": [1, 2, 3, 4],
            "right_eye": [1, 2, 3, 4],
            "mouth": [1, 2, 3],
        },
        {
            "face": [1, 2, 3, 4],
            "left_eye": [1, 2, 3, 4],
            "right_eye": [1, 2, 3, 4],
            "mouth": [1, 2, 3],
            "source": "guess",
        },
    ],
)
def test_from_dict_rejects_malformed(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FaceLayout.from_dict(data)


def test_scaled() -> None:
    layout = layout_from_box(10, 20, 100, 120)
    double = layout.scaled(2.0, 0.5)
    assert double.face == (20.0, 10.0, 200.0, 60.0)
    assert double.left_eye == (
        layout.left_eye[0] * 2,
        layout.left_eye[1] * 0.5,
        layout.left_eye[2] * 2,
        layout.left_eye[3] * 0.5,
    )
    assert double.mouth == (layout.mouth[0] * 2, layout.mouth[1] * 0.5, layout.mouth[2] * 2)
    assert double.source == layout.source
    assert layout.scaled(1.0, 1.0) == layout
