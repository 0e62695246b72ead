"""Media facts and transforms built on ffmpeg: probing streams, decoding audio, writing H.264.

There is no ffprobe in the bundled ffmpeg, so stream facts come from parsing `ffmpeg -i`
and exact counts from decoding with `-progress` output.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ffmpeg as ffmpeg_python
import numpy as np

from avatarcli.errors import InputError
from avatarcli.media import ffmpeg_bin

ANALYSIS_RATE = 16000  # Hz: enough for speech loudness and voicing, cheap to decode


@dataclass(frozen=True)
class Stream:
    kind: str  # "audio" or "video"
    codec: str
    sample_rate: int = 0
    channels: str = ""
    width: int = 0
    height: int = 0
    fps: float = 0.0
    attached_pic: bool = False


@dataclass(frozen=True)
class Probe:
    path: Path
    format: str
    duration_s: float | None
    streams: tuple[Stream, ...]
    tags: dict[str, str]  # the container's metadata (title, comment, ...)

    def first(self, kind: str) -> Stream | None:
        return next((s for s in self.streams if s.kind == kind and not s.attached_pic), None)


_STREAM_RE = re.compile(r"^\s*Stream #\d+:\d+.*?: (Audio|Video): (.*)$")
_DURATION_RE = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_INPUT_RE = re.compile(r"^Input #0, ([^,]+(?:,[^,]+)*?), from")


def probe(path: Path) -> Probe:
    """Streams and container duration of a media file, from `ffmpeg -i` (no ffprobe needed)."""
    return _parse_probe(path, ffmpeg_bin.run(["-i", str(path)], check=False))


def _parse_probe(path: Path, stderr: str) -> Probe:
    """The Probe from what `ffmpeg -i` prints about its input (an output's part is ignored)."""
    stderr = re.split(r"^(?:Stream mapping:|Output #0)", stderr, maxsplit=1, flags=re.M)[0]
    fmt_m = next((m for line in stderr.splitlines() if (m := _INPUT_RE.match(line))), None)
    if fmt_m is None:
        raise InputError(f"{path}: not a media file ffmpeg can read "
                         f"({ffmpeg_bin.tail(stderr, 1) or 'unknown format'})")
    dur_m = _DURATION_RE.search(stderr)
    duration = None
    if dur_m:
        hours, minutes, seconds = dur_m.groups()
        duration = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    streams = []
    for line in stderr.splitlines():
        sm = _STREAM_RE.match(line)
        if sm:
            streams.append(_parse_stream(sm.group(1).lower(), sm.group(2)))
    return Probe(path, fmt_m.group(1), duration, tuple(streams), _container_tags(stderr))


def _container_tags(stderr: str) -> dict[str, str]:
    """`Metadata:` lines of the input, before its first stream (the container's own tags)."""
    tags: dict[str, str] = {}
    head = stderr.split("  Duration:", 1)[0]
    for line in head.splitlines():
        m = re.match(r"^\s{4}(\w+)\s*: (.*)$", line)
        if m:
            tags[m.group(1)] = m.group(2).strip()
    return tags


def _parse_stream(kind: str, desc: str) -> Stream:
    codec = desc.split(",")[0].split()[0] if desc else "?"
    if kind == "audio":
        rate = re.search(r"(\d+) Hz", desc)
        parts = [p.strip() for p in desc.split(",")]
        channels = parts[2] if len(parts) > 2 else ""
        return Stream("audio", codec, sample_rate=int(rate.group(1)) if rate else 0,
                      channels=channels)
    size = re.search(r", (\d{2,5})x(\d{2,5})", desc)
    fps = re.search(r"([\d.]+) fps", desc)
    return Stream(
        "video", codec,
        width=int(size.group(1)) if size else 0, height=int(size.group(2)) if size else 0,
        fps=float(fps.group(1)) if fps else 0.0, attached_pic="attached pic" in desc,
    )


# The audio's one timeline: gaps in its timestamps (a late start in a video, a damaged
# stretch of an MP3) are filled with silence, so every decode of it has the same length and
# the audio stays where a player would put it.
TIMELINE_FILTER = "aresample=async=1:first_pts=0"


def decode_to_wav(src: Path, dst: Path) -> float:
    """Decode the first audio track of `src`, on its timeline, to a 16-bit PCM WAV at its own
    rate and channels; written under a temporary name, then renamed. Returns its seconds."""
    import wave

    tmp = dst.with_name(f".{dst.name}.tmp.wav")
    args = ["-v", "error", "-y", "-i", str(src), "-map", "0:a:0", "-af", TIMELINE_FILTER,
            "-c:a", "pcm_s16le", "-f", "wav", str(tmp)]
    try:
        ffmpeg_bin.run(args)
        with wave.open(str(tmp), "rb") as w:
            seconds = w.getnframes() / w.getframerate()
        os.replace(tmp, dst)
    except ffmpeg_bin.FFmpegError as exc:
        raise InputError(f"{src}: cannot decode audio ({ffmpeg_bin.tail(exc.stderr_tail, 1)})"
                         ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return seconds


def decode_audio_chunks(path: Path, *, rate: int = ANALYSIS_RATE,
                        chunk_samples: int = ANALYSIS_RATE * 10) -> Iterator[np.ndarray]:
    """Stream the first audio track as mono float32 at `rate`, in chunks (flat memory)."""
    args = (
        ffmpeg_python.input(str(path))
        .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=rate, map="0:a:0",
                af=TIMELINE_FILTER)
        .global_args("-loglevel", "error")
        .get_args()
    )
    proc = ffmpeg_bin.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        want = chunk_samples * 4
        pending = b""
        while True:
            data = proc.stdout.read(want - len(pending))
            if not data:
                break
            pending += data
            if len(pending) == want:
                yield np.frombuffer(pending, dtype="<f4")
                pending = b""
        usable = len(pending) - len(pending) % 4
        if usable:
            yield np.frombuffer(pending[:usable], dtype="<f4")
        err = proc.stderr.read().decode("utf-8", "replace")
        if proc.wait() != 0:
            # Killed (the host's out-of-memory killer) or out of memory/disk: not the file.
            ffmpeg_bin.raise_for_environment(proc.returncode, err, args)
            raise InputError(f"{path}: cannot decode audio ({ffmpeg_bin.tail(err, 1)})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def video_frames(path: Path, *, decode: bool = True) -> int:
    """Frames in the first video stream; `decode=False` counts packets (fast, catches truncation)."""
    args = ["-v", "error", "-i", str(path), "-map", "0:v:0", *([] if decode else ["-c", "copy"])]
    stderr = ffmpeg_bin.run([*args, "-f", "null", "-progress", "pipe:2", "-nostats", "-"])
    return _progress_frames(stderr)


def _progress_frames(stderr: str) -> int:
    frames = re.findall(r"^frame=(\d+)", stderr, re.M)
    return int(frames[-1]) if frames else 0


def probe_frames(path: Path, *, decode: bool = True) -> tuple[Probe, int | None, str]:
    """`probe` and `video_frames` in one ffmpeg run (one start of ffmpeg fewer per check).

    Returns (probe, frames, error): frames is None when the first video stream could not be
    read to its end (no video stream, or ffmpeg failed: `error` says why). Raises like
    `probe` when the file is not media at all.
    """
    args = ["-i", str(path), "-map", "0:v:0", *([] if decode else ["-c", "copy"]),
            "-f", "null", "-progress", "pipe:2", "-nostats", "-"]
    # At the default log level ffmpeg describes its input (the probe) before reading it.
    cmd = ffmpeg_bin.command(args)
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False,
                          preexec_fn=ffmpeg_bin.die_with_parent)
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        ffmpeg_bin.raise_for_environment(proc.returncode, stderr, cmd)
    info = _parse_probe(path, stderr)
    if proc.returncode != 0:
        said = [line for line in stderr.splitlines() if not _PROGRESS_RE.match(line)]
        return info, None, ffmpeg_bin.tail("\n".join(said), 3) or f"exit {proc.returncode}"
    return info, _progress_frames(stderr), ""


_PROGRESS_RE = re.compile(r"^\w+=\S*$")  # a `-progress` line (key=value)


def audio_seconds(path: Path, *, decode: bool = True) -> float:
    """Length of the first audio stream, in seconds: decoded, or with `decode=False` from
    its packets' timestamps (the container's edit list applied; measured equal to the
    decoded length to the microsecond for AAC in MP4 at 16, 22.05 and 48 kHz)."""
    stderr = ffmpeg_bin.run(["-v", "error", "-i", str(path), "-map", "0:a:0",
                         *([] if decode else ["-c", "copy"]), "-f", "null",
                         "-progress", "pipe:2", "-nostats", "-"])
    times = re.findall(r"^out_time_us=(\d+)", stderr, re.M)
    return int(times[-1]) / 1e6 if times else 0.0


def slice_audio(src: Path, dst: Path, *, start_s: float, duration_s: float,
                rate: int = 16000) -> None:
    """Cut [start, start+duration) of `src` to a mono 16-bit WAV, padded with silence past the
    end. A negative `start_s` puts that much silence in front of the recording's start."""
    lead = max(0, round(-start_s * rate))  # samples of silence before the recording
    # Resample first, so the delay counts output samples exactly; apad fills the end.
    chain = f"aresample={rate},adelay=delays={lead}S:all=1,apad" if lead else "apad"
    args = (
        ffmpeg_python.input(str(src), ss=f"{max(0.0, start_s):.6f}")
        .output(str(dst), t=f"{duration_s:.6f}", af=chain, ac=1, ar=rate, acodec="pcm_s16le",
                map="0:a:0")
        .global_args("-loglevel", "error", "-y")
        .get_args()
    )
    ffmpeg_bin.run(args)


class VideoWriter:
    """Pipe raw frames into an H.264 MP4 (video only). Use as a context manager.

    `pix_fmt` is what `write` receives: rgb24 (B, H, W, 3), or yuv420p (B, H*3/2, W) planes
    as cv2.COLOR_RGB2YUV_I420 makes them; yuv420p is half the bytes and spares x264 a
    colour conversion. A writer thread and a 1 MiB pipe let rendering and encoding overlap
    (measured at 512x512: 1500 frames in 3.0 s instead of 5.2 s).
    """

    QUEUE_CHUNKS = 3  # chunks in flight: bounds memory, enough to keep x264 fed
    PIPE_BYTES = 1 << 20
    _SENTINEL = object()

    def __init__(self, path: Path, *, width: int, height: int, fps: int,
                 preset: str = "veryfast", crf: int = 20, threads: int = 0,
                 pix_fmt: str = "rgb24") -> None:
        self.path = path
        args = (
            ffmpeg_python.input("pipe:", format="rawvideo", pix_fmt=pix_fmt,
                                s=f"{width}x{height}", framerate=fps)
            .output(str(path), vcodec="libx264", preset=preset, crf=crf, pix_fmt="yuv420p",
                    r=fps, threads=threads, movflags="+faststart", format="mp4")
            .global_args("-loglevel", "error", "-y")
            .get_args()
        )
        self._args = args
        self._proc = ffmpeg_bin.popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError, AttributeError):  # Linux only; a bigger buffer helps
            import fcntl

            fcntl.fcntl(self._proc.stdin.fileno(), 1031, self.PIPE_BYTES)  # F_SETPIPE_SZ
        self._queue: queue.Queue[object] = queue.Queue(maxsize=self.QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._written = 0  # chunks handed to the pipe (or dropped after an error)
        self._done = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._pump, name="encoder-pipe", daemon=True)
        self._thread.start()
        self.frames = 0

    def _pump(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            while isinstance(chunk := self._queue.get(), memoryview):
                if self._error is None:
                    try:
                        stdin.write(chunk)
                    except (BrokenPipeError, ValueError, OSError) as exc:
                        self._error = exc  # keep draining so the producer never blocks
                with self._done:
                    self._written += 1
                    self._done.notify_all()
        finally:
            with self._done:
                self._stopped = True
                self._done.notify_all()

    def write(self, frames: np.ndarray) -> None:
        """Queue frames for encoding; the array is handed over: it must not be changed until
        `wait_written` says this chunk is written."""
        if self._error is not None:
            self.close()  # raises with ffmpeg's own message
        self._queue.put(np.ascontiguousarray(frames).data)
        self.frames += len(frames)

    def wait_written(self, chunks: int) -> None:
        """Block until the first `chunks` chunks given to `write` are in the pipe: their
        arrays are the caller's again (the pipe's writer copies what it does not write)."""
        with self._done:
            self._done.wait_for(lambda: self._written >= chunks or self._stopped)
        if self._written < chunks:
            raise RuntimeError(f"VideoWriter: {chunks} chunks awaited, {self._written} written")

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(self._SENTINEL)
            self._thread.join()
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        err = self._proc.stderr.read().decode("utf-8", "replace") if self._proc.stderr else ""
        if self._proc.wait() != 0:  # a full disk or a killed encoder: the machine's problem
            ffmpeg_bin.raise_for_environment(self._proc.returncode, err, self._args)
        if self._proc.returncode != 0 or self._error is not None:
            raise ffmpeg_bin.FFmpegError(f"ffmpeg could not encode {self.path}: "
                                     f"{ffmpeg_bin.tail(err, 3) or self._error}", ffmpeg_bin.tail(err))

    def abort(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._thread.is_alive():
            self._queue.put(self._SENTINEL)  # the pump errors out on the dead pipe and drains
            self._thread.join(timeout=5)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def normalise(src: Path, dst: Path, *, frames: int, width: int, height: int, fps: int,
              preset: str = "veryfast", crf: int = 18) -> None:
    """Re-encode a model's video to exactly `frames` frames of width x height at `fps`, no audio.

    Models render their own frame counts, rates and sizes (LiveAvatar: clips*infer_frames-3
    frames); parts must match the plan to join in sync. Extra frames are cut at the end, a
    short video is padded by repeating its last frame, another rate is re-timed.
    """
    vf = (f"fps={fps},scale={width}:{height}:force_original_aspect_ratio=increase:"
          f"flags=lanczos,crop={width}:{height},setsar=1,"
          f"tpad=stop_mode=clone:stop_duration={frames / fps:.3f}")
    args = (
        ffmpeg_python.input(str(src))
        .output(str(dst), vf=vf, vcodec="libx264", preset=preset, crf=crf, pix_fmt="yuv420p",
                r=fps, format="mp4", an=None, movflags="+faststart", **{"frames:v": frames})
        .global_args("-loglevel", "error", "-y")
        .get_args()
    )
    ffmpeg_bin.run(args)


def read_frames(path: Path, *, width: int, height: int) -> Iterator[np.ndarray]:
    """Decode the first video stream as yuv420p planes, one (H*3/2, W) uint8 array per frame
    (the layout VideoWriter takes with pix_fmt="yuv420p")."""
    args = ["-v", "error", "-i", str(path), "-map", "0:v:0", "-f", "rawvideo",
            "-pix_fmt", "yuv420p", "-s", f"{width}x{height}", "pipe:"]
    proc = ffmpeg_bin.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    size = width * height * 3 // 2
    try:
        while len(data := proc.stdout.read(size)) == size:
            yield np.frombuffer(data, np.uint8).reshape(height * 3 // 2, width)
        err = proc.stderr.read().decode("utf-8", "replace")
        if proc.wait() != 0:
            raise ffmpeg_bin.FFmpegError(f"ffmpeg could not decode {path}: {ffmpeg_bin.tail(err, 1)}",
                                     ffmpeg_bin.tail(err))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def video_frames_md5(path: Path) -> str:
    """MD5 of a video's decoded frames: equal for two files that show exactly the same frames."""
    import hashlib

    proc = ffmpeg_bin.popen(["-v", "error", "-i", str(path), "-map", "0:v", "-f", "rawvideo",
                            "-"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    h = hashlib.md5()
    while block := proc.stdout.read(1 << 20):
        h.update(block)
    if proc.wait() != 0:
        raise RuntimeError(f"{path}: ffmpeg could not decode it")
    return h.hexdigest()
