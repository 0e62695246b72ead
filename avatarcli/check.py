"""`avatar check`: is a finished video right? Streams, length, frozen or black frames,
lip-sync offset and the jumps at the seams where parts were joined.

One decoding pass at a small analysis size gives every per-frame figure: the change from the
previous frame (frozen stretches, seams), the mean and spread of the luma (black or blank
frames) and the mouth region's darkness, which grows as it opens (lip sync). The mouth signal is
cross-correlated with the speech loudness per frame; the best lag is reported only when the
evidence is clear, otherwise it is "unknown" (never a made-up 0). Nothing here needs metadata
except the seam check, which reads the frame numbers `avatar gen` writes into the MP4.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatarcli import analysis
from avatarcli.errors import ExitStatus, InputError
from avatarcli.media import ffmpeg_bin, streams

log = logging.getLogger(__name__)

ANALYSIS_SIDE = 384  # px: frames are scaled so their longest side is at most this
SEAM_SIDE = 64  # px: seams are measured on copies this small (encoder noise averages out)
MOUTH_CROP = (24, 32)  # (h, w) px the mouth region is resampled to, per frame
FACE_RETRY_FRAMES = 25  # try to find the face again this many frames later
EXIT_FAILED = ExitStatus.CHECK  # `avatar check`: the video failed a check
SEAM_TAG = "avatarcli seams"  # the MP4 `description` tag: "avatarcli seams 150,300 overlap 8"
MIN_MOUTH_ACTIVITY = 0.4  # 0-255 luma: a mouth signal steadier than this is no evidence
DETREND_S = 1.0  # slow drifts (pose, light, loudness level) are removed over this window


@dataclass(frozen=True)
class Thresholds:
    """What `check` accepts; every field is a command-line option."""

    # The largest lip-sync offset that passes, in frames (either way).
    max_offset_frames: int = 1
    # Lags searched either way, in frames.
    max_lag_frames: int = 10
    # A best correlation below this is weak evidence: the lag is "unknown".
    min_sync_corr: float = 0.3
    # Fail when the lag is unknown (no face, or weak evidence) instead of only reporting it.
    require_sync: bool = False
    # The longest run of unchanged frames that passes, in seconds.
    max_frozen_s: float = 1.0
    # Mean absolute change (0-255 luma) at or below which two frames count as identical:
    # re-encoding a still gives <= 0.02, a built-in render's quietest pause about 0.05.
    frozen_diff: float = 0.03
    # Mean luma (0-255) below which a frame is black.
    black_luma: float = 20.0
    # Luma standard deviation below which a frame is blank (one flat colour).
    blank_std: float = 2.0
    # Black or blank frames allowed.
    max_black_frames: int = 0
    # The largest change across a seam that passes, as a multiple of the median change
    # (on a 64 px copy). Natural motion reaches about 6x (a built-in render's blinks).
    max_seam_ratio: float = 8.0


@dataclass
class Item:
    """One check: whether it holds (None: not applicable or unknown) and its figures."""

    ok: bool | None
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    video: str
    audio: str
    fps: float
    frames: int
    items: dict[str, Item]

    @property
    def ok(self) -> bool:
        return all(item.ok is not False for item in self.items.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, item in self.items.items() if item.ok is False]

    def to_dict(self) -> dict[str, Any]:
        return {"video": self.video, "audio": self.audio, "fps": self.fps,
                "frames": self.frames, "ok": self.ok, "failed": self.failed,
                "checks": {name: asdict(item) for name, item in self.items.items()}}

    def lines(self) -> list[str]:
        """One human-readable line per check."""
        mark = {True: "ok  ", False: "FAIL", None: "--  "}
        return [f"{mark[item.ok]} {name:<8} {item.detail}" for name, item in self.items.items()]


def seam_tag(seams: list[int], overlap_frames: int) -> str:
    """The metadata text `avatar gen` writes: where parts join, and how much they overlap."""
    return f"{SEAM_TAG} {','.join(map(str, seams)) or '-'} overlap {overlap_frames}"


def parse_seam_tag(text: str | None) -> tuple[list[int], int] | None:
    """(seam frames, overlap frames) from a `description` tag; None when it is not ours."""
    if not text:
        return None
    m = re.fullmatch(re.escape(SEAM_TAG) + r" ([\d,]+|-) overlap (\d+)", text.strip())
    if m is None:
        return None
    seams = [] if m.group(1) == "-" else [int(s) for s in m.group(1).split(",") if s]
    return seams, int(m.group(2))


# --- decoding -----------------------------------------------------------------------------

@dataclass
class FrameStats:
    """Per-frame figures from one decoding pass."""

    diff: np.ndarray  # (N,) mean |frame - previous| in 0-255 luma; diff[0] = nan
    coarse: np.ndarray  # (N,) the same on a tiny copy (SEAM_SIDE): pose, not encoder noise
    luma: np.ndarray  # (N,) mean luma
    spread: np.ndarray  # (N,) luma standard deviation
    mouth: np.ndarray  # (N,) mouth opening (darkness); nan before the face was found
    face: tuple[float, float, float, float] | None  # in analysis pixels
    face_frame: int  # the frame the face was found in (-1: none)
    size: tuple[int, int]  # analysis (width, height)


def _analysis_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, ANALYSIS_SIDE / max(width, height))
    w = max(2, round(width * scale / 2) * 2)
    h = max(2, round(height * scale / 2) * 2)
    return w, h


def _mouth_box(layout: Any, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the lips: wider than the mouth, mostly below the lip line."""
    cx, cy, hw = layout.mouth
    hw = max(hw, 0.12 * layout.face[2])
    x0, x1 = int(max(0, cx - 1.25 * hw)), int(min(width, cx + 1.25 * hw))
    y0, y1 = int(max(0, cy - 0.6 * hw)), int(min(height, cy + 1.1 * hw))
    return x0, y0, max(x1, x0 + 2), max(y1, y0 + 2)


def scan_frames(path: Path, width: int, height: int) -> FrameStats:
    """Decode `path` once at a small size and measure every frame."""
    import cv2

    from avatarcli.engines.builtin.face import find_face

    w, h = _analysis_size(width, height)
    args = ["-v", "error", "-i", str(path), "-map", "0:v:0",
            "-vf", f"scale={w}:{h}:flags=area", "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:"]
    proc = ffmpeg_bin.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    frame_bytes = w * h * 3
    diff: list[float] = []
    coarse: list[float] = []
    cw, ch = max(2, round(w * SEAM_SIDE / max(w, h))), max(2, round(h * SEAM_SIDE / max(w, h)))
    small_prev: np.ndarray | None = None
    luma: list[float] = []
    spread: list[float] = []
    crops: list[np.ndarray | None] = []
    prev: np.ndarray | None = None
    box: tuple[int, int, int, int] | None = None
    face: tuple[float, float, float, float] | None = None
    face_frame, next_try = -1, 0
    try:
        while True:
            data = proc.stdout.read(frame_bytes)
            if len(data) < frame_bytes:
                break
            rgb = np.frombuffer(data, np.uint8).reshape(h, w, 3)
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            g = gray.astype(np.float32)
            i = len(luma)
            luma.append(float(g.mean()))
            spread.append(float(g.std()))
            diff.append(float("nan") if prev is None else float(np.abs(g - prev).mean()))
            prev = g
            small = cv2.resize(g, (cw, ch), interpolation=cv2.INTER_AREA)
            coarse.append(float("nan") if small_prev is None
                          else float(np.abs(small - small_prev).mean()))
            small_prev = small
            if box is None and i >= next_try and spread[-1] >= 2.0:
                layout = find_face(rgb)
                next_try = i + FACE_RETRY_FRAMES
                if layout is not None:
                    box = _mouth_box(layout, w, h)
                    face, face_frame = layout.face, i
            if box is None:
                crops.append(None)
            else:
                x0, y0, x1, y1 = box
                crops.append(cv2.resize(gray[y0:y1, x0:x1], (MOUTH_CROP[1], MOUTH_CROP[0]),
                                        interpolation=cv2.INTER_AREA))
        err = proc.stderr.read().decode("utf-8", "replace")
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0 and not luma:
        raise InputError(f"{path}: cannot decode the video ({ffmpeg_bin.tail(err, 1)})")
    return FrameStats(diff=np.asarray(diff, np.float64),
                      coarse=np.asarray(coarse, np.float64), luma=np.asarray(luma, np.float64),
                      spread=np.asarray(spread, np.float64),
                      mouth=_mouth_signal(crops), face=face, face_frame=face_frame,
                      size=(w, h))


def _mouth_signal(crops: list[np.ndarray | None]) -> np.ndarray:
    """How open the mouth is, per frame: the darkness of the mouth region (nan: no face yet).

    An open mouth shows its dark inside. (Departure from a "resting" look was tried first:
    which look is at rest is ambiguous in a video that talks most of the time, and on the
    demo video it turned the signal upside down.)
    """
    out = np.full(len(crops), np.nan)
    for i, crop in enumerate(crops):
        if crop is not None:
            out[i] = 255.0 - float(crop.mean())
    return out


# --- the figures ----------------------------------------------------------------------------

def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    padded = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _detrend(x: np.ndarray, window: int) -> np.ndarray:
    if window < 3 or x.size < window:
        return x - x.mean()
    kernel = np.ones(window) / window
    half = window // 2
    smooth = np.convolve(np.pad(x, half, mode="edge"), kernel, mode="same")[half:half + x.size]
    return x - smooth


def speech_envelope(features: np.ndarray) -> np.ndarray:
    """Per-frame loudness of the voiced part of speech: level (0-1) x voiced-band share.

    Vowels open the mouth, fricatives and breaths hardly do: on a built-in render this
    envelope follows the mouth with a correlation of about 0.87 at lag 0, plain loudness
    only about 0.45 (and less sharply).
    """
    return (features[:, 0] * features[:, 1]).astype(np.float64)


def sync_offset(mouth: np.ndarray, level: np.ndarray, *, fps: float, max_lag: int,
                min_corr: float) -> dict[str, Any]:
    """The lag (frames) at which the mouth best follows the loudness.

    lag > 0: the picture is late (the mouth moves `lag` frames after the sound); lag < 0: the
    picture is early. `lag` is None ("unknown") when there is no mouth signal, it does not
    move, or the best correlation is below `min_corr`.
    """
    n = min(len(mouth), len(level))
    mouth, level = mouth[:n], level[:n].astype(np.float64)
    valid = ~np.isnan(mouth)
    result: dict[str, Any] = {"lag_frames": None, "lag_ms": None, "corr": None,
                              "mouth_activity": None, "curve": {}}
    if valid.sum() < 4 * max_lag + 8:
        result["reason"] = "no face found" if not valid.any() else "too few frames with a face"
        return result
    start = int(np.argmax(valid))
    m, a = mouth[start:], level[start:]
    activity = float(np.std(m))
    result["mouth_activity"] = round(activity, 3)
    if activity < MIN_MOUTH_ACTIVITY:
        result["reason"] = "the mouth does not move"
        return result
    if float(np.std(a)) < 1e-3:
        result["reason"] = "the audio has no loudness changes"
        return result
    window = max(3, round(DETREND_S * fps) | 1)
    m, a = _detrend(m, window), _detrend(a, window)
    curve: dict[int, float] = {}
    for lag in range(-max_lag, max_lag + 1):
        # mouth[t] against level[t - lag]
        if lag >= 0:
            x, y = m[lag:], a[:len(a) - lag]
        else:
            x, y = m[:len(m) + lag], a[-lag:]
        if len(x) < 8 or x.std() < 1e-9 or y.std() < 1e-9:
            continue
        curve[lag] = float(np.corrcoef(x, y)[0, 1])
    result["curve"] = {str(k): round(v, 3) for k, v in curve.items()}
    if not curve:
        result["reason"] = "no overlap to correlate"
        return result
    best = max(curve, key=lambda k: (curve[k], -abs(k)))
    result["corr"] = round(curve[best], 3)
    if curve[best] < min_corr:
        result["reason"] = f"weak evidence (best correlation {curve[best]:.2f} < {min_corr:g})"
        return result
    if abs(best) == max_lag:
        result["reason"] = f"the best lag is at the edge of the search (+-{max_lag} frames)"
        return result
    result["lag_frames"] = best
    result["lag_ms"] = round(best * 1000.0 / fps, 1)
    return result


def check(video: Path, audio: Path | None = None, *,
          thresholds: Thresholds | None = None) -> Report:
    """Measure `video` (against `audio`, default its own track) and judge every check.

    Raises InputError when `video` is missing or not a video ffmpeg can read.
    """
    t = thresholds or Thresholds()
    if not video.is_file():
        raise InputError(f"{video}: video file not found")
    if audio is not None and not audio.is_file():
        raise InputError(f"{audio}: audio file not found")
    info = streams.probe(video)
    vstream = info.first("video")
    if info.format.endswith("_pipe") or info.format.startswith("image2"):
        raise InputError(f"{video}: an image, not a video")
    if vstream is None:
        raise InputError(f"{video}: no video stream")
    if vstream.fps <= 0 or vstream.width <= 0:
        raise InputError(f"{video}: cannot tell the video's frame rate or size")
    fps = vstream.fps
    items: dict[str, Item] = {}

    own_audio = info.first("audio") is not None
    source = audio if audio is not None else (video if own_audio else None)
    if audio is not None:
        a_info = streams.probe(audio)
        if a_info.first("audio") is None:
            raise InputError(f"{audio}: no audio stream")
    items["streams"] = Item(
        ok=source is not None,
        detail=("video and audio" if own_audio else "video only")
        + (f"; audio from {audio}" if audio is not None else ""),
        figures={"video": vstream.codec, "audio": own_audio, "width": vstream.width,
                 "height": vstream.height, "fps": fps})

    stats = scan_frames(video, vstream.width, vstream.height)
    n = len(stats.luma)
    video_s = n / fps
    frame_s = 1.0 / fps

    # Length: the video against the audio, within one frame.
    feats = analysis.analyse(source, max(1, round(fps))) if source is not None else None
    if feats is None:
        items["length"] = Item(None, "no audio to compare with",
                               {"video_s": round(video_s, 3)})
    else:
        delta = video_s - feats.duration_s
        items["length"] = Item(
            abs(delta) <= frame_s + 1e-3,
            f"video {video_s:.3f} s, audio {feats.duration_s:.3f} s ({delta * fps:+.2f} frames)",
            {"video_s": round(video_s, 4), "audio_s": round(feats.duration_s, 4),
             "delta_frames": round(delta * fps, 3)})

    # Frame count: decoded frames against the container's duration x fps.
    if info.duration_s:
        expected = info.duration_s * fps
        items["frames"] = Item(
            abs(n - expected) <= 1.0 + 1e-6,
            f"{n} frames decoded, {expected:.1f} expected from {info.duration_s:.3f} s "
            f"x {fps:g} fps",
            {"decoded": n, "expected": round(expected, 2), "container_s": info.duration_s})
    else:
        items["frames"] = Item(None, f"{n} frames decoded; the container gives no duration",
                               {"decoded": n})

    # Frozen stretches: runs of frames that do not change.
    same = np.nan_to_num(stats.diff, nan=np.inf) <= t.frozen_diff
    runs = [(a - 1, b) for a, b in _runs(same)]  # a run of k "same" steps spans k+1 frames
    longest = max(runs, key=lambda r: r[1] - r[0], default=(0, 0))
    longest_frames = longest[1] - longest[0]
    limit = t.max_frozen_s * fps
    bad_runs = [r for r in runs if r[1] - r[0] > limit]
    items["frozen"] = Item(
        not bad_runs,
        (f"longest unchanged run {longest_frames} frames ({longest_frames / fps:.2f} s) at "
         f"frame {longest[0]}" if longest_frames else "no unchanged frames")
        + (f"; {len(bad_runs)} run(s) over {t.max_frozen_s:g} s" if bad_runs else ""),
        {"longest_frames": longest_frames, "longest_start": longest[0] if longest_frames else None,
         "runs_over_limit": [[a, b] for a, b in bad_runs[:20]]})

    # Black or blank frames.
    black = stats.luma < t.black_luma
    blank = stats.spread < t.blank_std
    bad = black | blank
    spans = _runs(bad)
    items["black"] = Item(
        int(bad.sum()) <= t.max_black_frames,
        f"{int(black.sum())} black, {int(blank.sum())} blank frame(s)"
        + (f", first at frame {spans[0][0]}" if spans else ""),
        {"black_frames": int(black.sum()), "blank_frames": int(blank.sum()),
         "spans": [[a, b] for a, b in spans[:20]]})

    # Lip sync.
    if feats is None:
        items["sync"] = Item(None, "no audio to compare with", {"lag_frames": None})
    else:
        envelope = speech_envelope(feats.features)
        if abs(fps - round(fps)) > 1e-3:  # 29.97 fps and the like: resample to frame times
            at = (np.arange(n) + 0.5) / fps
            envelope = np.interp(at, (np.arange(envelope.size) + 0.5) / round(fps), envelope)
        sync = sync_offset(stats.mouth, envelope, fps=fps, max_lag=t.max_lag_frames,
                           min_corr=t.min_sync_corr)
        sync["face_frame"] = stats.face_frame if stats.face_frame >= 0 else None
        lag = sync["lag_frames"]
        if lag is None:
            ok: bool | None = False if t.require_sync else None
            detail = f"lag unknown: {sync['reason']}"
            if sync["corr"] is not None:
                detail += f" (correlation {sync['corr']:.2f})"
        else:
            ok = abs(lag) <= t.max_offset_frames
            side = "late" if lag > 0 else "early" if lag < 0 else "in sync"
            detail = (f"lag {lag:+d} frame(s) ({sync['lag_ms']:+.0f} ms, picture {side}), "
                      f"correlation {sync['corr']:.2f}")
        items["sync"] = Item(ok, detail, sync)

    # Seams: the change across each join against the median change.
    tag = parse_seam_tag(info.tags.get("description"))
    diffs = stats.coarse[1:]
    median = float(np.median(diffs)) if diffs.size else 0.0
    if tag is None:
        items["seams"] = Item(None, "no seam metadata (not made by avatar gen)",
                              {"median_change": round(median, 4)})
    else:
        seams, overlap = tag
        floor = max(median, 0.02)  # a still video's median is ~0: do not divide by noise
        away = np.ones(n, bool)
        away[0] = False
        for s in seams:
            away[max(0, s - overlap - 1):s + 2] = False
        elsewhere = stats.coarse[away]
        p99 = float(np.percentile(elsewhere, 99)) / floor if elsewhere.size else 0.0
        jumps = []
        for s in seams:
            # The largest change from the overlap's start to one frame past the cut, so
            # neither a blend nor a misplaced one can hide the jump.
            near = [stats.coarse[k] for k in range(s - overlap - 1, s + 2) if 0 < k < n]
            jump = float(max(near)) if near else float("nan")
            jumps.append({"frame": s, "change": round(jump, 4),
                          "ratio": round(jump / floor, 3) if near else None})
        worst = max((j["ratio"] for j in jumps if j["ratio"] is not None), default=0.0)
        items["seams"] = Item(
            all(j["ratio"] is not None and j["ratio"] <= t.max_seam_ratio for j in jumps),
            f"{len(seams)} seam(s), overlap {overlap} frames, largest jump {worst:.2f}x the "
            f"median change {median:.3f}" if seams else "one part: no seams",
            {"seams": jumps, "overlap_frames": overlap, "median_change": round(median, 4),
             "max_ratio": worst, "elsewhere_p99_ratio": round(p99, 3)})
    return Report(video=str(video), audio=str(source) if source else "", fps=fps, frames=n,
                  items=items)


def quick_figures(report: Report) -> dict[str, Any]:
    """The few figures `avatar gen` keeps in its summary and manifest."""
    sync = report.items["sync"].figures
    seams = report.items["seams"].figures
    frozen = report.items["frozen"].figures
    black = report.items["black"].figures
    return {
        "ok": report.ok, "failed": report.failed,
        "lag_frames": sync.get("lag_frames"), "lag_ms": sync.get("lag_ms"),
        "sync_corr": sync.get("corr"), "sync_reason": sync.get("reason"),
        "frozen_longest_frames": frozen.get("longest_frames"),
        "black_frames": black.get("black_frames"), "blank_frames": black.get("blank_frames"),
        "seam_max_ratio": seams.get("max_ratio"),
    }



def warnings(report: Report) -> list[str]:
    """What `avatar gen` warns about: a lag that is not 0 (or unknown), and failed checks."""
    out = []
    sync = report.items["sync"]
    lag = sync.figures.get("lag_frames")
    if lag is not None and lag != 0:
        out.append(f"{report.video}: lip sync is off by {lag:+d} frame(s) "
                   f"({sync.figures['lag_ms']:+.0f} ms, picture {'late' if lag > 0 else 'early'})")
    elif lag is None and sync.figures.get("reason"):
        out.append(f"{report.video}: lip-sync lag unknown ({sync.figures['reason']})")
    out += [f"{report.video}: check {name} failed: {item.detail}"
            for name, item in report.items.items() if item.ok is False and name != "sync"]
    return out
