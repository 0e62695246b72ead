"""`avatar check`: streams, length, frozen or black frames, lip sync and seams of a video."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avatarcli.check import Thresholds
from avatarcli.cli.app import app
from avatarcli.cli.common import LogFile, Verbose, handle_errors, setup_logging

_CHECK = Thresholds()  # option defaults

@app.command("check")
@handle_errors
def check_cmd(
    video: Annotated[Path, typer.Argument(metavar="VIDEO", help="The video to check (any MP4 or other video ffmpeg reads).")],
    audio: Annotated[Path | None, typer.Argument(metavar="[AUDIO]",
                                                 help="The speech it must match [default: the video's own audio track].")] = None,
    max_offset: Annotated[int, typer.Option("--max-offset", min=0, max=50, metavar="FRAMES",
                                            help="Largest lip-sync offset that passes.")] = _CHECK.max_offset_frames,
    max_lag: Annotated[int, typer.Option("--max-lag", min=2, max=50, metavar="FRAMES",
                                         help="Lags searched either way.")] = _CHECK.max_lag_frames,
    min_corr: Annotated[float, typer.Option("--min-corr", min=0.0, max=1.0,
                                            help="Weaker best correlation: the lag is unknown.")] = _CHECK.min_sync_corr,
    require_sync: Annotated[bool, typer.Option("--require-sync", help="Fail when the lag is unknown (no face, weak evidence).")] = _CHECK.require_sync,
    max_frozen: Annotated[float, typer.Option("--max-frozen", min=0.0, metavar="SECONDS",
                                              help="Longest run of unchanged frames that passes.")] = _CHECK.max_frozen_s,
    frozen_diff: Annotated[float, typer.Option("--frozen-diff", min=0.0, max=255.0,
                                               help="Mean change (0-255) at or below which frames count as identical.")] = _CHECK.frozen_diff,
    black_luma: Annotated[float, typer.Option("--black-luma", min=0.0, max=255.0,
                                              help="Mean luma below which a frame is black.")] = _CHECK.black_luma,
    blank_std: Annotated[float, typer.Option("--blank-std", min=0.0, max=128.0,
                                             help="Luma spread below which a frame is blank.")] = _CHECK.blank_std,
    max_black: Annotated[int, typer.Option("--max-black", min=0, metavar="FRAMES",
                                           help="Black or blank frames allowed.")] = _CHECK.max_black_frames,
    max_seam: Annotated[float, typer.Option("--max-seam", min=0.0, metavar="RATIO",
                                            help="Largest change across a seam, x the median change.")] = _CHECK.max_seam_ratio,
    as_json: Annotated[bool, typer.Option("--json", help="Print every figure as JSON on stdout.")] = False,
    log_file: LogFile = None,
    verbose: Verbose = False,
) -> None:
    """Check a finished video: streams, length, frozen or black frames, lip sync, seams.

    Exits 0 when every check holds, 5 when one fails.
    """
    from avatarcli import check

    setup_logging(verbose, True, log_file)
    thresholds = Thresholds(
        max_offset_frames=max_offset, max_lag_frames=max_lag, min_sync_corr=min_corr,
        require_sync=require_sync, max_frozen_s=max_frozen, frozen_diff=frozen_diff,
        black_luma=black_luma, blank_std=blank_std, max_black_frames=max_black,
        max_seam_ratio=max_seam)
    report = check.check(video, audio, thresholds=thresholds)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
    else:
        typer.echo(f"{report.video}: {report.frames} frames at {report.fps:g} fps")
        for line in report.lines():
            typer.echo(f"  {line}")
        typer.echo("all checks hold" if report.ok else f"failed: {', '.join(report.failed)}")
    if not report.ok:
        raise typer.Exit(check.EXIT_FAILED)


