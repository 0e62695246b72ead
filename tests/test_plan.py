from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarcli.analysis import frame_count
from avatarcli.plan import (
    Batch,
    Plan,
    batch_count,
    check_cover,
    make_plan,
    plan_batches,
    quietest_near,
    snap_radius,
)


@given(
    frames=st.integers(1, 40_000),
    infer=st.integers(4, 240),
    per_batch=st.integers(1, 100),
    seed=st.integers(0, 2**16),
    with_audio=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_batches_cover_every_frame_exactly_once(frames: int, infer: int, per_batch: int,
                                               seed: int, with_audio: bool) -> None:
    loud = np.random.default_rng(seed).normal(-30, 10, frames) if with_audio else None
    batches = plan_batches(frames, infer_frames=infer, clips_per_batch=per_batch,
                           loudness_db=loud)
    check_cover(batches, frames)  # raises on gaps, overlaps, empty batches
    covered = np.zeros(frames, int)
    for b in batches:
        covered[b.frame_start:b.frame_end] += 1
        assert b.clips == -(-b.frames // infer)
    assert (covered == 1).all()
    batch_frames = infer * per_batch
    # Boundaries move at most about one clip from their nominal place.
    for k, b in enumerate(batches[1:], start=1):
        assert abs(b.frame_start - k * batch_frames) <= snap_radius(batch_frames, infer)
    # No batch is longer than a nominal batch plus a merged tail and a snap on each side.
    assert max(b.frames for b in batches) < batch_frames + 3 * infer


def test_boundary_moves_to_the_pause() -> None:
    loud = np.full(500, -20.0)
    loud[110:118] = -80.0  # a pause 14-22 frames after the nominal boundary at 96
    batches = plan_batches(500, infer_frames=48, clips_per_batch=2, loudness_db=loud)
    assert 110 <= batches[1].frame_start < 118


def test_boundary_stays_put_in_uniform_audio() -> None:
    batches = plan_batches(1000, infer_frames=50, clips_per_batch=4,
                           loudness_db=np.full(1000, -20.0))
    assert [b.frame_start for b in batches] == [0, 200, 400, 600, 800]


def test_short_tail_joins_previous_batch() -> None:
    # 2*48 frames per batch; 200 frames leave a tail of 8 < one clip.
    assert batch_count(200, 96, 48) == 2
    batches = plan_batches(200, infer_frames=48, clips_per_batch=2)
    assert [(b.frame_start, b.frame_end) for b in batches] == [(0, 96), (96, 200)]
    assert batches[-1].clips == 3


def test_quietest_near_prefers_nominal_on_ties_and_respects_bounds() -> None:
    loud = np.full(100, -30.0)
    assert quietest_near(loud, 50, 10, 0, 99) == 50
    loud[20] = -90.0
    assert quietest_near(loud, 50, 10, 0, 99) == 50  # out of reach
    assert quietest_near(loud, 25, 10, 22, 99) >= 22  # clamped by lo


def test_frame_count_is_ceil_of_duration() -> None:
    assert frame_count(1.0, 25) == 25
    assert frame_count(1.001, 25) == 26
    assert frame_count(0.0, 25) == 0
    assert frame_count(0.1 * 3 * 4, 25) == 30  # 1.2000000000000002 s: float noise, not a frame


def test_plan_round_trips_and_rejects_gaps() -> None:
    plan = make_plan(300, fps=25, width=512, height=512, infer_frames=48, clips_per_batch=2)
    assert Plan.from_dict(plan.to_dict()) == plan
    broken = plan.to_dict()
    broken["batches"][1]["frame_start"] += 1
    with pytest.raises(AssertionError):
        Plan.from_dict(broken)
    with pytest.raises(AssertionError):
        check_cover([Batch(0, 0, 10, 1), Batch(1, 10, 10, 0)], 10)
