"""`avatar gen`: one recording and one portrait into one verified video."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avatarcli import presets
from avatarcli.cli.app import app
from avatarcli.cli.common import (
    AsJson,
    CliEvents,
    ExecutorOpt,
    GpusOpt,
    JobsOpt,
    KeepParts,
    LogFile,
    NoCheck,
    PresetOpt,
    Quiet,
    RayAddress,
    SetOpt,
    Verbose,
    check_line,
    echo,
    executor_for,
    handle_errors,
    log,
    overrides,
    parse_face,
    preset_ref,
    show_bar,
    start,
)
from avatarcli.pipeline import GenerateOptions, Result, generate


@app.command("gen")
@handle_errors
def gen(
    audio: Annotated[Path, typer.Argument(metavar="AUDIO",
                                          help="Speech recording (any format ffmpeg reads).")],
    image: Annotated[Path, typer.Argument(metavar="IMAGE",
                                          help="Portrait (any image Pillow or OpenCV reads).")],
    output: Annotated[Path | None, typer.Option("-o", "--output",
                                                help="Output MP4 [default: AUDIO with .mp4].")] = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    jobs: JobsOpt = 1,
    gpus: GpusOpt = None,
    prompt: Annotated[str | None, typer.Option("--prompt",
                                               help="Text prompt for model engines.")] = None,
    face: Annotated[str | None, typer.Option("--face", metavar="X,Y,W,H",
                                             help="Face box in image pixels when detection fails.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; render nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output; discard a mismatching or damaged job.")] = False,
    keep_parts: KeepParts = False,
    no_check: NoCheck = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddress = "auto",
    quiet: Quiet = False,
    as_json: AsJson = False,
    log_file: LogFile = None,
    verbose: Verbose = False,
) -> None:
    """Render AUDIO spoken by the face in IMAGE into one verified MP4 (resumable)."""
    start(verbose, quiet or as_json, log_file)
    resolved = presets.resolve(preset_ref(preset, gpus),
                               presets.parse_set(overrides(set_, no_check)), prompt=prompt)
    events = CliEvents(bar=show_bar(quiet or as_json), quiet=quiet or as_json)
    out_dir = (output or audio).expanduser().absolute().parent
    options = GenerateOptions(jobs=jobs, gpus=gpus, dry_run=dry_run, force=force,
                              keep_parts=keep_parts)
    with executor_for(executor, ray_address, None if dry_run else resolved.preset,
                      [audio.absolute(), image.absolute()], [out_dir], gpus) as runs_on:
        result = generate(audio, image, resolved, output=output, face=parse_face(face),
                          options=options, events=events, executor=runs_on)
    if as_json:
        echo(json.dumps(result.summary(), indent=1))
    elif dry_run:
        print_plan(result)
    elif not quiet:
        retried = [f"batch {b.index} at rung {b.rung}" for b in result.batches if b.rung]
        echo(f"wrote {result.output} ({result.duration_s:.1f} s, {result.frames} frames, "
                   f"{result.width}x{result.height}; {len(result.batches)} batch(es): "
                   f"{len(result.rendered)} rendered, {len(result.reused)} reused) "
                   f"in {result.seconds:.1f} s")
        if retried:
            echo(f"after out-of-memory retries: {', '.join(retried)} "
                       f"(lighter settings from the preset's oom_retry)")
        if result.telemetry.get("summary"):
            echo(f"batches: {result.telemetry['summary']}")
        if result.check:
            echo(f"check: {check_line(result.check)}")
    if not dry_run:
        log.debug("done", extra={"fields": {"event": "job", "status": "done",
                                            **result.summary()}})




def print_plan(result: Result) -> None:
    echo(f"plan: {result.duration_s:.2f} s of audio -> {result.frames} frames at "
               f"{result.fps} fps, {result.width}x{result.height}, preset {result.preset} "
               f"(engine {result.engine}), {len(result.batches)} batch(es)")
    echo(f"output: {result.output}")
    echo(f"job dir: {result.job_dir}")
    for b in result.batches:
        echo(f"  batch {b.index:4d}: frames {b.frame_start}-{b.frame_end - 1} "
                   f"({b.frame_end - b.frame_start}), {b.start_s:.2f}-{b.end_s:.2f} s, "
                   f"{b.clips} clip(s)")
        if b.command:
            echo(f"    {b.command}")


