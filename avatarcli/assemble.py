"""Joining parts without re-encoding, muxing the original audio once, verifying, publishing."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from avatarcli import ffmpeg, media
from avatarcli.verify import VerifyError, check_video


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _concat_line(path: Path) -> str:
    # The concat demuxer's quoting: single quotes, with ' written as '\''.
    return "file '" + str(path.resolve()).replace("'", "'\\''") + "'\n"


def crossfade(parts: list[Path], leads: list[int], out: Path, *, width: int, height: int,
              fps: int, x264_preset: str = "veryfast", crf: int = 18) -> int:
    """Join `parts` into one video (no audio), blending each overlap; returns frames written.

    Part i starts with `leads[i]` frames that the previous part also covers (its last ones).
    Over that overlap the picture fades linearly from the previous part to this one (weight
    (j+1)/(lead+1) for overlap frame j), so a model restarted at each batch changes its look
    gradually instead of at one cut; the overlap frames are written once.
    """
    if len(leads) != len(parts) or (leads and leads[0] != 0):
        raise ValueError(f"leads {leads} do not fit {len(parts)} parts (the first has none)")
    written = 0
    held: list[np.ndarray] = []  # the previous part's last frames, waiting to be blended
    with media.VideoWriter(out, width=width, height=height, fps=fps, preset=x264_preset,
                           crf=crf, pix_fmt="yuv420p") as writer:
        for i, part in enumerate(parts):
            lead, hold = leads[i], (leads[i + 1] if i + 1 < len(parts) else 0)
            pending: list[np.ndarray] = []
            count = 0
            for j, frame in enumerate(media.read_frames(part, width=width, height=height)):
                if j < lead:
                    w = (j + 1) / (lead + 1)
                    mixed = held[j].astype(np.float32) * (1.0 - w) + frame * np.float32(w)
                    frame = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
                pending.append(frame)
                count += 1
                if len(pending) > hold:
                    writer.write(pending.pop(0)[None])
                    written += 1
            if count < lead + hold:
                raise VerifyError(f"{part}: {count} frames, too few for an overlap of "
                                  f"{lead} + {hold}")
            held = pending
    return written


def assemble(parts: list[Path], audio: Path, output: Path, *, audio_s: float, frames: int,
             width: int, height: int, fps: int, tag: str = "", seams: str = "",
             leads: list[int] | None = None, audio_bitrate: str = "192k") -> None:
    """Concatenate `parts`, mux `audio` as AAC, verify, then atomically move to `output`.

    With `leads` (frames each part repeats from the previous one), the parts are crossfaded
    and re-encoded first; otherwise they are joined without re-encoding. `seams` goes into
    the MP4's description: where parts join (`check.seam_tag`).
    """
    joined: Path | None = None
    if leads and any(leads):
        fd, joined_name = tempfile.mkstemp(prefix=".joined-", suffix=".mp4", dir=output.parent)
        os.close(fd)
        joined = Path(joined_name)
        try:
            crossfade(parts, leads, joined, width=width, height=height, fps=fps)
        except BaseException:
            joined.unlink(missing_ok=True)
            raise
        parts = [joined]
    fd, list_name = tempfile.mkstemp(prefix=".concat-", suffix=".txt", dir=output.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(_concat_line(p) for p in parts)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=".tmp.mp4",
                                    dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        ffmpeg.run([
            "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", list_name,
            "-i", str(audio), "-map", "0:v:0", "-map", "1:a:0",
            "-c:v", "copy", "-c:a", "aac", "-b:a", audio_bitrate,
            # Which job made this file: lets a batch rerun skip outputs that are done.
            *(["-metadata", f"comment={tag}"] if tag else []),
            # Where the parts join, for `avatar check` to measure the jump at each.
            *(["-metadata", f"description={seams}"] if seams else []),
            "-movflags", "+faststart", "-f", "mp4", str(tmp),
        ])
        verify_output(tmp, audio_s=audio_s, frames=frames, width=width, height=height, fps=fps)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; an output is a normal file
        os.replace(tmp, output)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.unlink(list_name)
        if joined is not None:
            with contextlib.suppress(OSError):
                joined.unlink(missing_ok=True)


def verify_output(path: Path, *, audio_s: float, frames: int, width: int, height: int,
                  fps: int) -> None:
    """Video and audio present, the planned frame count, and the audio's duration within a frame."""
    info = check_video(path, frames=frames, width=width, height=height, fps=fps, decode=False)
    if info.first("audio") is None:
        raise VerifyError(f"{path}: no audio stream")
    got_audio = media.audio_seconds(path)
    video_s = frames / fps
    tolerance = 1.0 / fps
    if abs(got_audio - audio_s) > tolerance:
        raise VerifyError(f"{path}: audio lasts {got_audio:.3f} s, the recording {audio_s:.3f} s")
    if abs(video_s - audio_s) > tolerance:
        raise VerifyError(f"{path}: video lasts {video_s:.3f} s, the audio {audio_s:.3f} s")
