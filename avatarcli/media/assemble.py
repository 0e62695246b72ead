"""Joining parts without re-encoding, muxing the original audio once, verifying, publishing."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from avatarcli.errors import InputError
from avatarcli.media import ffmpeg_bin, streams
from avatarcli.media.verify import VerifyError, check_video


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _concat_line(path: Path) -> bytes:
    # The concat demuxer's quoting: single quotes, with ' written as '\''. Bytes: a path need
    # not be valid UTF-8.
    return b"file '" + os.fsencode(path.resolve()).replace(b"'", b"'\\''") + b"'\n"


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
    with streams.VideoWriter(out, width=width, height=height, fps=fps, preset=x264_preset,
                           crf=crf, pix_fmt="yuv420p") as writer:
        for i, part in enumerate(parts):
            lead, hold = leads[i], (leads[i + 1] if i + 1 < len(parts) else 0)
            pending: list[np.ndarray] = []
            count = 0
            for j, frame in enumerate(streams.read_frames(part, width=width, height=height)):
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


AUDIO_BITRATE = "192k"
# The fast coder: 0.23 s of CPU for a minute of speech where the default (twoloop) takes 0.6 s,
# the largest step of the built-in engine's assembly; at 192 kb/s it is transparent for
# speech (measured: 40.7 dB SNR vs 36.7 dB).
AAC_ARGS = ("-c:a", "aac", "-aac_coder", "fast", "-b:a", AUDIO_BITRATE)


class AudioEncode:
    """The job's audio encoded to AAC in the background while the parts render (it needs
    only the timeline), so assembly copies it instead of encoding: `result()` is the encoded
    file, or None when the encode failed (assembly then encodes it itself)."""

    def __init__(self, audio: Path, out: Path) -> None:
        self.out = out
        self._partial = out.with_name(f".{out.stem}-encode{out.suffix}")
        self._proc = ffmpeg_bin.popen(["-v", "error", "-y", "-i", str(audio), "-vn", *AAC_ARGS,
                                       "-f", "mp4", str(self._partial)],
                                      stderr=subprocess.DEVNULL)

    def result(self) -> Path | None:
        if self._proc.wait() != 0:
            self._partial.unlink(missing_ok=True)
            return None
        os.replace(self._partial, self.out)  # whole, or not there
        return self.out

    def cancel(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._partial.unlink(missing_ok=True)


def assemble(parts: list[Path], audio: Path, output: Path, *, audio_s: float, frames: int,
             width: int, height: int, fps: int, tag: str = "", seams: str = "",
             leads: list[int] | None = None, work_dir: Path | None = None,
             overwrite: bool = False, encoded_audio: Path | None = None) -> None:
    """Concatenate `parts`, mux `audio` as AAC, verify, then atomically move to `output`.

    `encoded_audio`: `audio` already encoded (AudioEncode), copied instead of encoded.

    With `leads` (frames each part repeats from the previous one), the parts are crossfaded
    and re-encoded first; otherwise they are joined without re-encoding. `seams` goes into
    the MP4's description: where parts join (`check.seam_tag`). Temporary files live in
    `work_dir` (the job folder, on the output's filesystem), so a process killed mid-way
    leaves nothing beside the output. Without `overwrite`, a file that appeared at `output`
    meanwhile is kept and InputError raised (the job stays).
    """
    work = work_dir if work_dir is not None else output.parent
    joined: Path | None = None
    if leads and any(leads):
        fd, joined_name = tempfile.mkstemp(prefix=".joined-", suffix=".mp4", dir=work)
        os.close(fd)
        joined = Path(joined_name)
        try:
            crossfade(parts, leads, joined, width=width, height=height, fps=fps)
        except BaseException:
            joined.unlink(missing_ok=True)
            raise
        parts = [joined]
    fd, list_name = tempfile.mkstemp(prefix=".concat-", suffix=".txt", dir=work)
    with os.fdopen(fd, "wb") as f:
        f.writelines(_concat_line(p) for p in parts)
    fd, tmp_name = tempfile.mkstemp(prefix=".output.", suffix=".tmp.mp4", dir=work)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        ffmpeg_bin.run([
            "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", list_name,
            "-i", str(encoded_audio or audio), "-map", "0:v:0", "-map", "1:a:0",
            "-c:v", "copy", *(("-c:a", "copy") if encoded_audio else AAC_ARGS),
            # Which job made this file: lets a batch rerun skip outputs that are done.
            *(["-metadata", f"comment={tag}"] if tag else []),
            # Where the parts join, for `avatar check` to measure the jump at each.
            *(["-metadata", f"description={seams}"] if seams else []),
            "-movflags", "+faststart", "-f", "mp4", str(tmp),
        ])
        try:
            verify_output(tmp, audio_s=audio_s, frames=frames, width=width, height=height,
                          fps=fps)
        except VerifyError as exc:  # name the output, not a temporary that is about to go
            raise VerifyError(f"{output}: " + str(exc).replace(f"{tmp}: ", "", 1)) from exc
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; an output is a normal file
        publish(tmp, output, overwrite=overwrite)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.unlink(list_name)
        if joined is not None:
            with contextlib.suppress(OSError):
                joined.unlink(missing_ok=True)


def publish(tmp: Path, output: Path, *, overwrite: bool) -> None:
    """Move `tmp` to `output` atomically; unless `overwrite`, never replace what is there.

    The "exists" check at start is not enough: another process may create the output while
    the job renders. A hard link fails if the name exists (the check and the creation are
    one step); filesystems without hard links get an exclusive create of the name first.
    """
    if overwrite:
        os.replace(tmp, output)
        return
    try:
        os.link(tmp, output)
    except FileExistsError:
        raise _appeared(output) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK,
                             errno.EXDEV):
            raise
        try:  # claim the name, then replace our own empty claim
            os.close(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise _appeared(output) from None
        os.replace(tmp, output)
        return
    tmp.unlink()


def _appeared(output: Path) -> InputError:
    return InputError(f"{output}: output appeared while the job was rendering; it was kept "
                      f"(rerun with --force to replace it: the rendered parts are reused)")


def verify_output(path: Path, *, audio_s: float, frames: int, width: int, height: int,
                  fps: int) -> None:
    """Video and audio present, the planned frame count, and the audio's duration within a frame.

    Packets, not samples: the parts were verified when they were made, and the audio was
    encoded by the ffmpeg run that wrote this file (which failed unless it finished), so
    reading every packet of both streams proves the file whole; the audio's packet
    timestamps give the same length as decoding it (which took ~0.07 s a minute).
    """
    info = check_video(path, frames=frames, width=width, height=height, fps=fps, decode=False)
    if info.first("audio") is None:
        raise VerifyError(f"{path}: no audio stream")
    got_audio = streams.audio_seconds(path, decode=False)
    video_s = frames / fps
    tolerance = 1.0 / fps
    if abs(got_audio - audio_s) > tolerance:
        raise VerifyError(f"{path}: audio lasts {got_audio:.3f} s, the recording {audio_s:.3f} s")
    if abs(video_s - audio_s) > tolerance:
        raise VerifyError(f"{path}: video lasts {video_s:.3f} s, the audio {audio_s:.3f} s")
