"""Wall time, throughput and peak memory of a batch process, and their sum over a job.

A `Sampler` watches one process tree from a daemon thread (a batch process and whatever it
launched, e.g. torchrun and its ranks): the peak of the tree's summed RSS and, for the GPUs it
was given, the peak used memory of each device. Units: MB = MiB.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from avatarcli import gpus

log = logging.getLogger(__name__)

_MIB = 2**20


@dataclass
class Telemetry:
    """What one batch process cost. `frames` is set by the caller; None/{} = unknown."""

    wall_s: float
    frames: int = 0
    peak_rss_mb: float | None = None
    peak_gpu_mb: dict[str, float] = field(default_factory=dict)
    gpu_name: str | None = None
    started_at: float | None = None  # epoch seconds, so overlapping batches can be told apart

    @property
    def fps(self) -> float | None:
        return self.frames / self.wall_s if self.wall_s > 0 and self.frames > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "frames": self.frames,
                "fps": None if self.fps is None else round(self.fps, 3),
                "peak_rss_mb": _round(self.peak_rss_mb),
                "peak_gpu_mb": {k: round(v, 1) for k, v in sorted(self.peak_gpu_mb.items(),
                                                                   key=_device_key)},
                "gpu_name": self.gpu_name,
                "started_at": None if self.started_at is None else round(self.started_at, 3)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Telemetry:
        return cls(wall_s=float(data.get("wall_s") or 0.0), frames=int(data.get("frames") or 0),
                   peak_rss_mb=_float(data.get("peak_rss_mb")),
                   peak_gpu_mb={str(k): float(v) for k, v in (data.get("peak_gpu_mb") or {}).items()},
                   gpu_name=data.get("gpu_name"), started_at=_float(data.get("started_at")))

    def summary_line(self) -> str:
        return summary_line(self.wall_s, self.fps, self.peak_rss_mb, self.peak_gpu_mb)


def summary_line(wall_s: float, fps: float | None, peak_rss_mb: float | None,
                 peak_gpu_mb: Mapping[str, float]) -> str:
    """`12.3 s, 243.9 frames/s, peak RSS 231 MB, GPU 0: 61234 MB, 1: 60110 MB`."""
    rate = "n/a frames/s" if fps is None else f"{fps:.1f} frames/s"
    rss = "n/a" if peak_rss_mb is None else f"{peak_rss_mb:.0f} MB"
    gpu = (", ".join(f"{k}: {v:.0f} MB" for k, v in sorted(peak_gpu_mb.items(), key=_device_key))
           if peak_gpu_mb else "n/a")
    return f"{wall_s:.1f} s, {rate}, peak RSS {rss}, GPU {gpu}"


def aggregate(items: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """One job's summary from its batches' Telemetry dicts (as a manifest stores them).

    wall_s: sum of the batches' wall times. elapsed_s: time during which at least one batch
    ran (batches in parallel counted once, pauses between runs of a resumed job not at all),
    None when a batch has no start time. fps: frames / elapsed_s, else frames / wall_s.
    Peaks are the maximum over batches (per device for GPUs). Missing entries are skipped.
    """
    parts = [Telemetry.from_dict(d) for d in items if d]
    wall = sum(t.wall_s for t in parts)
    frames = sum(t.frames for t in parts)
    elapsed = None
    if parts and all(t.started_at is not None for t in parts):
        elapsed = _union_length([(t.started_at or 0.0, (t.started_at or 0.0) + t.wall_s)
                                 for t in parts])
    span = elapsed if elapsed else wall
    rss = [t.peak_rss_mb for t in parts if t.peak_rss_mb is not None]
    peak_gpu: dict[str, float] = {}
    for t in parts:
        for dev, mb in t.peak_gpu_mb.items():
            peak_gpu[dev] = max(peak_gpu.get(dev, 0.0), mb)
    fps = frames / span if span > 0 and frames > 0 else None
    return {"parts": len(parts), "wall_s": round(wall, 3),
            "elapsed_s": None if elapsed is None else round(elapsed, 3), "frames": frames,
            "fps": None if fps is None else round(fps, 3),
            "peak_rss_mb": _round(max(rss)) if rss else None,
            "peak_gpu_mb": {k: round(v, 1) for k, v in sorted(peak_gpu.items(), key=_device_key)},
            "gpu_name": next((t.gpu_name for t in parts if t.gpu_name), None),
            "summary": summary_line(elapsed if elapsed is not None else wall, fps,
                                    max(rss) if rss else None, peak_gpu)}


class Sampler:
    """Peak memory of the process tree rooted at `pid` (and of `gpu_indices`) until stop().

    RSS is summed over the tree at each sample, so pages shared between processes (e.g. CUDA
    libraries of torchrun's ranks) count once per process: an upper bound. GPU memory is the
    device's whole used memory, which includes other processes sharing the card.
    """

    def __init__(self, pid: int, gpu_indices: list[str], interval_s: float = 0.2) -> None:
        self.pid = pid
        self.gpu_indices = list(gpu_indices)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._started_at: float | None = None
        self._peak_rss: float | None = None
        self._peak_gpu: dict[str, float] = {}
        self._gpu_name: str | None = None
        self._root: psutil.Process | None = None

    def start(self) -> Sampler:
        self._started = time.monotonic()
        self._started_at = time.time()
        try:
            self._root = psutil.Process(self.pid)
        except psutil.Error as exc:
            log.debug("telemetry: process %d: %s", self.pid, exc)
        self._thread = threading.Thread(target=self._loop, name=f"telemetry-{self.pid}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Telemetry:
        wall = time.monotonic() - self._started if self._started else 0.0
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a hung nvidia-smi times out after 20 s
        return Telemetry(wall_s=wall, peak_rss_mb=self._peak_rss, peak_gpu_mb=dict(self._peak_gpu),
                         gpu_name=self._gpu_name, started_at=self._started_at)

    def _loop(self) -> None:
        probe = None
        try:
            if self.gpu_indices:
                probe = gpus.open_memory_probe(self.gpu_indices)
                if probe is not None:
                    self._gpu_name = probe.name
            next_gpu = 0.0
            while True:
                self._sample_rss()
                if probe is not None and time.monotonic() >= next_gpu:
                    next_gpu = time.monotonic() + max(self.interval_s, probe.min_interval_s)
                    self._sample_gpu(probe)
                if self._stop.wait(self.interval_s):
                    break
            if probe is not None:  # a last look: the end of a batch is often its peak
                self._sample_gpu(probe)
        except Exception:  # telemetry must never take a batch down
            log.debug("telemetry: sampler stopped", exc_info=True)
        finally:
            if probe is not None:
                probe.close()

    def _tree(self) -> list[psutil.Process]:
        if self._root is None:
            return []
        try:
            children = self._root.children(recursive=True)
        except psutil.Error:
            children = []  # the root has gone; nothing left to measure
        return [self._root, *children]

    def _sample_rss(self) -> None:
        total, seen = 0, False
        for proc in self._tree():
            try:
                total += proc.memory_info().rss
                seen = True
            except psutil.Error:  # exited (or became a zombie) between listing and reading
                continue
        if seen:
            mb = total / _MIB
            if self._peak_rss is None or mb > self._peak_rss:
                self._peak_rss = mb

    def _sample_gpu(self, probe: gpus.MemoryProbe) -> None:
        for dev, mb in probe.read().items():
            if mb > self._peak_gpu.get(dev, -1.0):
                self._peak_gpu[dev] = mb
        if self._gpu_name is None:
            self._gpu_name = probe.name


def _device_key(item: tuple[str, Any]) -> tuple[int, int | str]:
    """Devices in numeric order ("2" before "10"), UUIDs after."""
    key = item[0]
    return (0, int(key)) if re.fullmatch(r"\d+", key) else (1, key)


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 1)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total
