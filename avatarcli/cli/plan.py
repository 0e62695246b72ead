"""`avatar plan`: a preset's GPU and host memory, the batches of a recording, and the levers that fit a card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from avatarcli import engines, inputs, presets
from avatarcli.cli.app import app
from avatarcli.cli.common import (
    AsJson,
    LogFile,
    PresetOpt,
    SetOpt,
    Verbose,
    echo,
    handle_errors,
    preset_ref,
    setup_logging,
)
from avatarcli.errors import ExitStatus, InputError
from avatarcli.media import portrait

if TYPE_CHECKING:
    from avatarcli.engines.liveavatar.fit import MemoryPlan
    from avatarcli.gpus import GpuFact


@app.command("plan")
@handle_errors
def plan_cmd(
    audio: Annotated[Path | None, typer.Argument(metavar="[AUDIO]",
                                                 help="Optional recording: also plan its batches.")] = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    image: Annotated[Path | None, typer.Option("--image", metavar="IMAGE",
                                               help="The portrait: estimate at the frame size gen renders it at [default: the area key's own sides].")] = None,
    gpus: Annotated[int | None, typer.Option("--gpu-count", metavar="N", min=1, max=64,
                                             help="GPUs per launch (--fit: cards) [default: the preset's].")] = None,
    gpu_mem: Annotated[float | None, typer.Option("--gpu-mem", metavar="GB", min=1,
                                                  help="Memory of one card [default: the smallest visible].")] = None,
    host_mem: Annotated[float | None, typer.Option("--host-mem", metavar="GB", min=1,
                                                   help="Host RAM [default: this machine's].")] = None,
    fit_: Annotated[bool, typer.Option("--fit", help="Choose the fastest memory levers (resident worker) that fit the cards and host RAM; print them as --set lines.")] = False,
    tflops: Annotated[float, typer.Option("--tflops", min=0,
                                          help="Card's effective bf16 TFLOPS for --fit's time estimate [default: an RTX 4090's, assumed].")] = 0.0,
    pcie: Annotated[float, typer.Option("--pcie", metavar="GB/S", min=0,
                                        help="Pinned host-to-GPU copy rate [default: PCIe 4.0 x16, assumed].")] = 0.0,
    as_json: AsJson = False,
    log_file: LogFile = None,
    verbose: Verbose = False,
) -> None:
    """Estimate a preset's peak GPU memory per card; with AUDIO, the batch plan and time."""
    from avatarcli import gpus as gpu_info
    from avatarcli import history
    from avatarcli.engines.liveavatar import fit

    setup_logging(verbose, as_json, log_file)
    facts = gpu_info.facts()
    resolved = presets.resolve(preset_ref(preset, None), presets.parse_set(set_ or []))
    host = host_mem if host_mem is not None else gpu_info.host_memory_gb()
    if fit_:
        if not _fit(resolved, facts, gpus=gpus, gpu_mem=gpu_mem, host=host, tflops=tflops,
                    pcie=pcie, as_json=as_json):
            raise typer.Exit(ExitStatus.FAILED)
        return
    for what, path in (("audio", audio), ("image", image)):
        if path is not None and not path.is_file():
            raise InputError(f"{path}: {what} file not found")
    # The frame size and the plan `gen` would make (one function decides each).
    p = resolved.preset
    size = presets.parse_size(p.size)
    if image is not None:
        rgb = portrait.load(image)
        size = inputs.frame_size(engines.create(p), rgb.shape[1], rgb.shape[0])
    planned = None
    if audio is not None:
        feats, plan = inputs.analyse_and_plan(audio, p, *size)
        planned = (feats.duration_s, plan)
    seen = history.seen(p, facts[0].name if facts else None)
    result = fit.memory_plan(resolved, gpus=gpus, gpu_mem_gb=gpu_mem, facts=facts, size=size,
                             planned=planned, seen=seen, host_mem_gb=host)
    if as_json:  # the verdict is in "fits"
        echo(json.dumps(result.to_dict(), indent=1))
        return
    _print_plan(result, seen, audio, image)
    if not result.fits:
        raise typer.Exit(ExitStatus.FAILED)


def _fit(resolved: presets.ResolvedPreset, facts: list[GpuFact], *, gpus: int | None,
         gpu_mem: float | None, host: float | None, tflops: float, pcie: float,
         as_json: bool) -> bool:
    """`plan --fit`: print the fastest levers that fit; False when nothing fits."""
    from avatarcli.engines.liveavatar import fit
    from avatarcli.engines.liveavatar import memory as mem_model

    rates = {"tflops": tflops or mem_model.GPU_TFLOPS,
             "pcie_gib_s": pcie or mem_model.PCIE_GIB_PER_S}
    name, found = fit.lever_fit(resolved, gpus=gpus, gpu_mem_gb=gpu_mem, facts=facts,
                                host_mem_gb=host, **rates)
    count = gpus or max(1, len(facts))
    card = gpu_mem if gpu_mem is not None else fit.smallest_card_gb(facts) or 0.0
    if as_json:
        echo(json.dumps({
            "baseline": name, "gpus": count, "gpu_mem_gb": card, "host_mem_gb": host,
            "fits": found is not None,
            "set": found.set_lines() if found else [],
            "workers": found.workers if found else 0,
            "fps_per_worker": round(found.cost.fps, 3) if found else None,
            "fps": round(found.fps, 3) if found else None,
            "per_gpu_peak_gb": round(found.estimate.per_gpu_peak_gb, 2) if found else None,
            "host_peak_gb": round(found.host.peak_gb, 2) if found else None,
            "components": ({k: round(v, 2) for k, v in found.estimate.components.items()}
                           if found else {}),
        }, indent=1))
        return found is not None
    card_only = None
    if found is None and host is not None:  # is it the host RAM, not the card?
        _, card_only = fit.lever_fit(resolved, gpus=gpus, gpu_mem_gb=gpu_mem, facts=facts,
                                     host_mem_gb=None, **rates)
    for line in fit.fit_lines(name, found, gpus=count, gpu_mem_gb=card, host_mem_gb=host,
                              card_only=card_only):
        echo(line)
    return found is not None


def _print_plan(result: MemoryPlan, seen: dict[str, Any], audio: Path | None,
                image: Path | None) -> None:
    echo(f"preset {result.preset} (engine {result.engine}), frames {result.width}x"
         f"{result.height}" + ("" if image else " (the area key's; --image IMAGE for a portrait's)"))
    if result.estimate is None:
        echo("  no GPU memory model for this engine (the built-in engine runs on the CPU)")
    else:
        echo(f"  on {result.gpus} x {result.gpu_mem_gb:g} GB:")
        for line in result.estimate.lines():
            echo(f"  {line}")
    if result.host is not None:
        for line in result.host.lines():
            echo(f"  {line}")
    if seen:
        peak = seen.get("peak_gpu_gb")
        echo(f"  seen on {seen['gpu']} in {seen['jobs']} earlier job(s): "
             f"{seen['fps']} frames/s" + (f", peak {peak} GB per GPU" if peak else ""))
    if audio is not None:
        echo(f"  {audio}: {result.duration_s:.1f} s -> {result.frames} frames in "
             f"{len(result.batches)} batch(es)")
        for b in result.batches:
            echo(f"    batch {b['index']:4d}: frames {b['frame_start']}-{b['frame_end'] - 1}"
                 f", {b['clips']} clip(s)")
        if result.est_seconds is not None:
            echo(f"  estimated time: {result.est_seconds / 60:.1f} min at "
                 f"{seen['fps']} frames/s")
