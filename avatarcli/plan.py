"""Clip and batch arithmetic: pure functions, every unit in the name.

A video of `frames` frames is cut into clips of `infer_frames` frames (the model's unit) and
batches of `clips_per_batch` clips (one process each). Batch boundaries are moved to the
quietest moment within about one clip of their nominal place, so cuts fall in pauses.
Invariant: batches are contiguous, non-empty, and cover [0, frames) exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

QUIET_WINDOW_FRAMES = 5  # loudness is averaged over ~200 ms at 25 fps to find a pause


@dataclass(frozen=True)
class Batch:
    index: int
    frame_start: int  # first frame, inclusive (global index)
    frame_end: int  # last frame, exclusive
    clips: int  # clips the engine renders: ceil(frames / infer_frames), the last one padded

    @property
    def frames(self) -> int:
        return self.frame_end - self.frame_start

    def start_s(self, fps: int) -> float:
        return self.frame_start / fps

    def end_s(self, fps: int) -> float:
        return self.frame_end / fps


@dataclass(frozen=True)
class Plan:
    fps: int
    frames: int
    width: int
    height: int
    infer_frames: int
    batches: tuple[Batch, ...]

    @property
    def clips(self) -> int:
        return sum(b.clips for b in self.batches)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batches"] = [asdict(b) for b in self.batches]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        batches = tuple(Batch(**b) for b in d["batches"])
        plan = cls(**{**d, "batches": batches})
        check_cover(plan.batches, plan.frames)
        return plan


def batch_count(frames: int, batch_frames: int, infer_frames: int) -> int:
    """Batches for `frames`; a tail shorter than one clip joins the previous batch."""
    if frames <= 0:
        return 0
    n = math.ceil(frames / batch_frames)
    if n > 1 and frames - (n - 1) * batch_frames < infer_frames:
        n -= 1
    return n


def nominal_boundaries(frames: int, batch_frames: int, infer_frames: int) -> list[int]:
    """Frame indices where batches start, before snapping (excluding 0)."""
    n = batch_count(frames, batch_frames, infer_frames)
    return [k * batch_frames for k in range(1, n)]


def snap_radius(batch_frames: int, infer_frames: int) -> int:
    """How far a boundary may move: about one clip, less than half a batch so batches stay non-empty."""
    return max(0, min(infer_frames, (batch_frames - 1) // 2))


def quietest_near(loudness_db: np.ndarray, nominal: int, radius: int, lo: int, hi: int) -> int:
    """The frame in [nominal-radius, nominal+radius] ∩ [lo, hi] whose neighbourhood is quietest.

    Ties go to the frame nearest `nominal`, so the result is deterministic.
    """
    start, stop = max(lo, nominal - radius), min(hi, nominal + radius)
    if start >= stop or loudness_db.size == 0:
        return min(max(nominal, lo), hi)
    half = QUIET_WINDOW_FRAMES // 2
    a, b = max(0, start - half), min(len(loudness_db), stop + half + 1)
    window = loudness_db[a:b].astype(np.float64)
    kernel = np.ones(QUIET_WINDOW_FRAMES) / QUIET_WINDOW_FRAMES
    smooth = np.convolve(np.pad(window, half, mode="edge"), kernel, mode="valid")
    candidates = np.arange(start, stop + 1)
    local = smooth[np.clip(candidates - a, 0, len(smooth) - 1)]
    order = np.lexsort((np.abs(candidates - nominal), np.round(local, 3)))
    return int(candidates[order[0]])


def plan_batches(frames: int, *, infer_frames: int, clips_per_batch: int,
                 loudness_db: Sequence[float] | np.ndarray | None = None) -> tuple[Batch, ...]:
    """Batches covering [0, frames), boundaries moved to pauses when loudness is given."""
    if infer_frames < 1 or clips_per_batch < 1:
        raise ValueError("infer_frames and clips_per_batch must be >= 1")
    batch_frames = infer_frames * clips_per_batch
    loud = np.asarray(loudness_db if loudness_db is not None else [], dtype=np.float32)
    radius = snap_radius(batch_frames, infer_frames) if loud.size else 0
    starts = [0]
    for nominal in nominal_boundaries(frames, batch_frames, infer_frames):
        # radius < batch/2 keeps neighbours apart; the last batch keeps at least one clip.
        hi = max(starts[-1] + 1, frames - infer_frames)
        starts.append(quietest_near(loud, nominal, radius, starts[-1] + 1, hi))
    ends = [*starts[1:], frames]
    batches = tuple(
        Batch(i, s, e, math.ceil((e - s) / infer_frames))
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if frames > 0
    )
    check_cover(batches, frames)
    return batches


def check_cover(batches: Sequence[Batch], frames: int) -> None:
    """Assert every frame in [0, frames) belongs to exactly one batch."""
    pos = 0
    for i, b in enumerate(batches):
        assert b.index == i, f"batch {i} has index {b.index}"
        assert b.frame_start == pos, f"batch {i} starts at {b.frame_start}, expected {pos}"
        assert b.frame_end > b.frame_start, f"batch {i} is empty"
        pos = b.frame_end
    assert pos == frames, f"batches cover {pos} frames of {frames}"


def lead_frames(batches: Sequence[Batch], index: int, overlap_frames: int) -> int:
    """Frames batch `index` renders before its own first frame (the seam overlap): none for
    the first batch, and never more than the previous batch holds."""
    if index == 0 or overlap_frames <= 0:
        return 0
    return min(overlap_frames, batches[index - 1].frames)


def render_range(plan: Plan, index: int, overlap_frames: int) -> Batch:
    """What the engine renders for batch `index`: the batch, started `lead_frames` earlier.

    The part keeps those leading frames; assembly crossfades them with the end of the
    previous part, so the joined video still has exactly `plan.frames` frames.
    """
    b = plan.batches[index]
    lead = lead_frames(plan.batches, index, overlap_frames)
    if lead == 0:
        return b
    start = b.frame_start - lead
    assert start >= 0, f"batch {index} would start at frame {start}"
    return Batch(b.index, start, b.frame_end, math.ceil((b.frame_end - start) / plan.infer_frames))


def make_plan(frames: int, *, fps: int, width: int, height: int, infer_frames: int,
              clips_per_batch: int, loudness_db: np.ndarray | None = None) -> Plan:
    batches = plan_batches(frames, infer_frames=infer_frames, clips_per_batch=clips_per_batch,
                           loudness_db=loudness_db)
    return Plan(fps, frames, width, height, infer_frames, batches)
