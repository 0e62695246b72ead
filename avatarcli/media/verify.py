"""Checks that a video file is whole: decodable, the planned frame count, size and rate."""

from __future__ import annotations

from pathlib import Path

from avatarcli.errors import AvatarError, ExitStatus
from avatarcli.media import streams


class VerifyError(AvatarError):
    """A part or the output is not what the plan says it must be."""

    exit_code = ExitStatus.ENGINE


def check_video(path: Path, *, frames: int, width: int, height: int, fps: int,
                decode: bool = True) -> streams.Probe:
    """Raise VerifyError unless `path` has exactly `frames` frames of width x height at fps.

    Returns the probe, so a caller checking more (the audio stream) need not probe again.
    """
    if not path.is_file() or path.stat().st_size == 0:
        raise VerifyError(f"{path}: missing or empty")
    # One ffmpeg run describes the file and reads (or decodes) its video to the end.
    info, got, error = streams.probe_frames(path, decode=decode)
    video = info.first("video")
    if video is None:
        raise VerifyError(f"{path}: no video stream")
    if (video.width, video.height) != (width, height):
        raise VerifyError(f"{path}: size {video.width}x{video.height}, expected {width}x{height}")
    if abs(video.fps - fps) > 0.01:
        raise VerifyError(f"{path}: {video.fps:g} fps, expected {fps}")
    if got is None:
        raise VerifyError(f"{path}: cannot be decoded ({error})")
    if got != frames:
        raise VerifyError(f"{path}: {got} frames, expected {frames}")
    return info


def is_whole(path: Path, *, frames: int, width: int, height: int, fps: int) -> bool:
    """A cheap resume check (packets, no decode) of a part marked done earlier."""
    try:
        check_video(path, frames=frames, width=width, height=height, fps=fps, decode=False)
    except AvatarError:
        return False
    return True
