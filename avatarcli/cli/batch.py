"""`avatar batch`: every row of a manifest (CSV or YAML), skipping current outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from avatarcli import batch, engines, presets
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
    err,
    executor_for,
    handle_errors,
    log,
    overrides,
    preset_ref,
    show_bar,
    start,
)
from avatarcli.errors import InputError
from avatarcli.pipeline import GenerateOptions
from avatarcli.runner import Executor


@app.command("batch")
@handle_errors
def batch_cmd(
    manifest: Annotated[Path, typer.Argument(metavar="MANIFEST",
                                             help="CSV or YAML: audio,image[,output,preset,prompt,set] per row.")],
    preset: PresetOpt = None,
    set_: SetOpt = None,
    redo: Annotated[bool, typer.Option("--redo", help="Render rows whose output is already current.")] = False,
    jobs: JobsOpt = 1,
    gpus: GpusOpt = None,
    keep_parts: KeepParts = False,
    no_check: NoCheck = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddress = "auto",
    rows_at_once: Annotated[int, typer.Option("--rows", min=1, max=256,
                                              help="Rows rendered at once (with --executor ray).")] = 1,
    quiet: Quiet = False,
    as_json: AsJson = False,
    log_file: LogFile = None,
    verbose: Verbose = False,
) -> None:
    """Render every row of MANIFEST; skip current outputs, record failures and go on."""
    start(verbose, quiet or as_json, log_file)
    rows = batch.load_manifest(manifest)
    preset = preset_ref(preset, gpus)
    set_ = overrides(set_, no_check)
    if preset or set_:  # a wrong -p or --set is a usage error, not a failure of every row
        presets.resolve(preset, presets.parse_set(set_))
    for problem in batch.validate(rows, preset=preset, overrides=set_):
        log.error("error: %s", problem)  # all of them, before anything renders
    valid = [r.resolved.preset for r in rows if r.resolved is not None]
    # Each row asks for its own preset's resources (batch.py: executor.for_row); the cluster
    # is checked for the most demanding row's.
    neediest = max(valid, key=lambda p: engines.engine_class(p.engine).resources(p).gpus,
                   default=None)
    inputs = sorted({p.absolute() for r in rows if r.resolved for p in (r.audio, r.image)})
    outputs = sorted({r.output.parent.absolute() for r in rows if r.resolved})
    with executor_for(executor, ray_address, neediest, inputs, outputs, gpus) as runs_on:
        if runs_on is None and rows_at_once > 1:
            raise InputError("--rows above 1 needs --executor ray (rows share this machine's "
                             "cores)")
        results = _run(rows, runs_on, GenerateOptions(jobs=jobs, gpus=gpus, force=redo,
                                                      keep_parts=keep_parts),
                       rows_at_once=rows_at_once, quiet=quiet, as_json=as_json)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed", "busy")}
    if as_json:
        echo(json.dumps({"rows": [r.to_dict() for r in results], **counts}, indent=1))
    elif not quiet:
        width = max(len(r.output) for r in results)
        for r in results:
            echo(f"{r.status:<8} {r.output:<{width}}  {r.reason}")
        echo(", ".join(f"{n} {s}" for s, n in counts.items()))
    code = batch.exit_code(results)
    if code:
        raise typer.Exit(code)


def _run(rows: list[batch.Row], runs_on: Executor | None, options: GenerateOptions, *,
         rows_at_once: int, quiet: bool, as_json: bool) -> list[batch.RowResult]:
    """Every row, with a bar of rows and one of the row being rendered (at a terminal)."""
    from tqdm import tqdm

    show = show_bar(quiet or as_json)
    with tqdm(total=len(rows), unit="video", desc="videos", disable=not show, position=0,
              file=sys.stderr, dynamic_ncols=True) as rows_bar:

        def on_result(r: batch.RowResult) -> None:
            rows_bar.update(1)
            # One summary line per job on stderr (failures even with --quiet), and the log file.
            detail = f" ({r.reason})" if r.reason else ""
            line = f"{r.status}: {r.output}{detail} in {r.seconds:.1f} s"
            if r.check:
                line += f"; check: {check_line(r.check)}"
            if r.status in ("failed", "busy") or not quiet:
                err(line)
            log.debug("%s", line, extra={"fields": {"event": "row", **r.to_dict()}})

        return batch.run_batch(
            rows, options,
            row_events=lambda row: CliEvents(bar=show, quiet=quiet or as_json, position=1,
                                             label=row.output.name),
            on_result=on_result, executor=runs_on, rows_at_once=rows_at_once)

