"""Will a preset fit these GPUs? `avatar plan` and `--preset auto` from the memory model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from avatarcli import presets
from avatarcli.engines.liveavatar import memory
from avatarcli.engines.liveavatar.options import options_of
from avatarcli.errors import InputError
from avatarcli.gpus import GpuFact, fp8_capable
from avatarcli.plan import Plan
from avatarcli.presets import parse_size

CPU_PRESET = presets.DEFAULT_PRESET


@dataclass
class MemoryPlan:
    preset: str
    engine: str
    gpus: int
    gpu_mem_gb: float
    estimate: memory.Estimate | None  # None for engines with no GPU model
    batches: list[dict[str, Any]] = field(default_factory=list)
    frames: int = 0
    duration_s: float = 0.0
    seen: dict[str, Any] = field(default_factory=dict)  # measured on this GPU model before
    est_seconds: float | None = None
    host: memory.HostEstimate | None = None  # host RAM of one launch (model engines)
    width: int = 0  # the frame size estimated for
    height: int = 0

    @property
    def fits(self) -> bool:
        return ((self.estimate is None or self.estimate.fits)
                and (self.host is None or self.host.fits))

    def to_dict(self) -> dict[str, Any]:
        est = self.estimate
        return {
            "preset": self.preset, "engine": self.engine, "gpus": self.gpus,
            "width": self.width, "height": self.height,
            "gpu_mem_gb": self.gpu_mem_gb,
            "per_gpu_peak_gb": round(est.per_gpu_peak_gb, 2) if est else None,
            "usable_gb": round(est.usable_gb, 2) if est else None,
            "fits": self.fits,
            "gpu_fits": est.fits if est else True,
            "host_peak_gb": round(self.host.peak_gb, 2) if self.host else None,
            "host_mem_gb": (round(self.host.total_gb, 2) if self.host and self.host.total_gb
                            else None),
            "host_fits": self.host.fits if self.host else True,
            "host_components": ({k: round(v, 2) for k, v in self.host.components.items()}
                                if self.host else {}),
            "headroom_gb": round(est.headroom_gb, 2) if est else None,
            "components": {k: round(v, 2) for k, v in est.components.items()} if est else {},
            "peak_phase": est.peak_phase if est else None,
            "notes": est.notes if est else [],
            "frames": self.frames, "duration_s": round(self.duration_s, 3),
            "batches": self.batches, "seen": self.seen, "est_seconds": self.est_seconds,
        }


def memory_plan(resolved: presets.ResolvedPreset, *, gpus: int | None, gpu_mem_gb: float | None,
                facts: list[GpuFact], size: tuple[int, int] | None = None,
                planned: tuple[float, Plan] | None = None, seen: dict[str, Any] | None = None,
                host_mem_gb: float | None = None) -> MemoryPlan:
    """The per-GPU memory estimate of a preset at frame `size` (default: the area key's own
    sides), and with `planned` (a recording's duration and batch plan) the batches and time."""
    p = resolved.preset
    width, height = size or parse_size(p.size)
    count = gpus or (options_of(p).gpus_per_run if p.engine == "liveavatar" else len(facts))
    mem = gpu_mem_gb if gpu_mem_gb is not None else smallest_card_gb(facts)
    est = None
    if p.engine == "liveavatar":
        if mem is None:
            raise InputError("no GPU visible: give the card size with --gpu-mem GB")
        if count not in (1, 5):
            raise InputError(f"--gpu-count {count}: LiveAvatar runs on 1 GPU or on 5 (4 DiT + 1 VAE); "
                             f"with 2-4 GPUs use a 1-GPU preset, one batch per GPU")
        est = memory.estimate(p, gpus=count, gpu_mem_gb=mem, width=width, height=height)
    result = MemoryPlan(resolved.name, p.engine, count, mem or 0.0, est, seen=seen or {},
                        width=width, height=height)
    if p.engine == "liveavatar":
        result.host = memory.host_estimate(p, total_gb=host_mem_gb, width=width, height=height)
    if planned is not None:
        result.duration_s, plan = planned
        result.frames = plan.frames
        result.batches = [{"index": b.index, "frame_start": b.frame_start,
                           "frame_end": b.frame_end, "clips": b.clips} for b in plan.batches]
        fps = (seen or {}).get("fps")
        if fps:
            result.est_seconds = round(plan.frames / fps, 1)
    return result


def smallest_card_gb(facts: list[GpuFact]) -> float | None:
    sizes = [f.total_gb for f in facts if f.total_gb]
    return min(sizes) if sizes else None


def auto_preset(facts: list[GpuFact], host_mem_gb: float | None = None) -> tuple[str, str]:
    """(name, why) of the best-quality built-in preset whose estimate fits the visible GPUs
    and, when `host_mem_gb` is known, the host RAM (the lever presets load the DiT in host
    memory). The why gives the planner's expected throughput (memory.step_cost)."""
    mem = smallest_card_gb(facts)
    if not facts or mem is None:
        return CPU_PRESET, "no GPU visible: the built-in CPU engine"
    fp8_ok = all(f.compute_capability is not None and fp8_capable(f.compute_capability)
                 for f in facts)
    candidates = {}
    for name, info in presets.available().items():
        if info.origin != "built-in":
            continue
        p = presets.resolve(name).preset
        if p.engine == "liveavatar" and (fp8_ok or not options_of(p).fp8):
            if host_mem_gb is not None and options_of(p).gpus_per_run == 1 and not (
                    memory.host_estimate(p, total_gb=host_mem_gb).fits):
                continue
            candidates[name] = p
    found = memory.best_fit(candidates, gpus=len(facts), gpu_mem_gb=mem)
    where = f"{len(facts)} x {facts[0].name} ({mem:.0f} GB)"
    if found is None:
        return CPU_PRESET, (f"no LiveAvatar preset's estimate fits {where}"
                            f"{'' if fp8_ok else ', fp8 needs compute capability 8.9+'}: "
                            f"the built-in CPU engine")
    name, est = found
    speed = ""
    if est.cost is not None:
        speed = (f", ~{est.cost.fps:.1f} frames/s per GPU estimated; `avatar plan -p {name} "
                 f"--fit` tunes its levers to this card")
    return name, (f"best-quality built-in preset that fits {where}: peak "
                  f"{est.per_gpu_peak_gb:.1f} GB of {est.usable_gb:.1f} GB usable per GPU"
                  f"{speed}")


# Quality baseline of `avatar plan --fit` when the preset is not a LiveAvatar one.
FIT_BASELINE = "liveavatar-80gb"


def lever_fit(resolved: presets.ResolvedPreset, *, gpus: int | None, gpu_mem_gb: float | None,
              facts: list[GpuFact], host_mem_gb: float | None,
              tflops: float = memory.GPU_TFLOPS,
              pcie_gib_s: float = memory.PCIE_GIB_PER_S) -> tuple[str, memory.LeverFit | None]:
    """`avatar plan --fit`: the fastest levers for the preset's size, clip length and steps on
    `gpus` cards (one single-GPU worker per card). Returns (baseline preset name, fit)."""
    name, p = resolved.name, resolved.preset
    if p.engine != "liveavatar":
        name, p = FIT_BASELINE, presets.resolve(FIT_BASELINE).preset
    count = gpus or max(1, len(facts))
    mem = gpu_mem_gb if gpu_mem_gb is not None else smallest_card_gb(facts)
    if mem is None:
        raise InputError("no GPU visible: give the card size with --gpu-mem GB")
    return name, memory.fit_levers(p, gpus=count, gpu_mem_gb=mem, host_mem_gb=host_mem_gb,
                                   tflops=tflops, pcie_gib_s=pcie_gib_s)


def fit_lines(name: str, found: memory.LeverFit | None, *, gpus: int, gpu_mem_gb: float,
              host_mem_gb: float | None,
              card_only: memory.LeverFit | None = None) -> list[str]:
    """What `avatar plan --fit` prints. card_only: the fit without the host-RAM bound, to say
    when the host RAM, not the card, is what nothing fits."""
    host = "host RAM unknown" if host_mem_gb is None else f"{host_mem_gb:.4g} GB host RAM"
    where = f"{gpus} x {gpu_mem_gb:g} GB, {host}"
    if found is None:
        out = [f"fit: nothing fits {where} at {name}'s size, clip length and steps "
               f"(try a smaller size or infer_frames)"]
        if card_only is not None:
            out.append(f"  the cards alone would fit (e.g. "
                       f"{' '.join(card_only.set_lines())}) but one worker needs "
                       f"{card_only.host.peak_gb:.1f} GB of host RAM (--host-mem GB for "
                       f"another machine)")
        return out
    p, cost = found.preset, found.cost
    head = (f"fit for {where}: {name}'s {p.size}, {p.infer_frames} frames/clip, "
            f"{p.sample_steps} steps, with the resident worker's levers")
    if gpus > 1:
        head += (f"; one single-GPU worker per card, {found.workers} batch(es) at once"
                 + ("" if found.workers == gpus else
                    f" (host RAM holds {found.workers} of {gpus} workers)"))
    out = [head, *[f"  {line}" for line in found.set_lines()],
           f"  expected: {cost.fps:.2f} frames/s per worker, {found.fps:.2f} frames/s with "
           f"{found.workers} worker(s) (step {cost.step_s:.2f} s; compute at "
           f"{cost.tflops:g} TFLOPS, copies at {cost.pcie_gib_s:g} GB/s: assumptions, "
           f"see memory.GPU_TFLOPS / PCIE_GIB_PER_S)",
           f"  per GPU: peak {found.estimate.per_gpu_peak_gb:.2f} GB of "
           f"{found.estimate.usable_gb:.2f} GB usable; host RAM {found.host.peak_gb:.1f} GB "
           f"per worker, {found.workers * found.host.peak_gb:.1f} GB for {found.workers}"]
    out += [f"  {line}" for line in found.estimate.lines()]
    out += [f"  {line}" for line in found.host.lines()]
    return out
