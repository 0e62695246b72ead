"""Joining parts without re-encoding, muxing the original audio once, verifying, publishing."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from avatarcli import ffmpeg, media
from avatarcli.verify import VerifyError, check_video


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _concat_line(path: Path) -> str:
    # The concat demuxer's quoting: single quotes, with ' written as '\''.
    return "file '" + str(path.resolve()).replace("'", "'\\''") + "'\n"


def assemble(parts: list[Path], audio: Path, output: Path, *, audio_s: float, frames: int,
             width: int, height: int, fps: int, tag: str = "", seams: str = "",
             audio_bitrate: str = "192k") -> None:
    """Concatenate `parts`, mux `audio` as AAC, verify, then atomically move to `output`.

    `seams` goes into the MP4's description: where parts join (`check.seam_tag`).
    """
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
