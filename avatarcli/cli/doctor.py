"""`avatar doctor`: this machine and a preset's engine set-up, with how to fix each problem."""

from __future__ import annotations

from pathlib import Path

import typer

from avatarcli import presets
from avatarcli.cli.app import app
from avatarcli.cli.common import (
    AsJson,
    LogFile,
    PresetOpt,
    SetOpt,
    Verbose,
    echo,
    handle_errors,
    setup_logging,
)


@app.command("doctor")
@handle_errors
def doctor_cmd(
    preset: PresetOpt = None,
    set_: SetOpt = None,
    as_json: AsJson = False,
    log_file: LogFile = None,
    verbose: Verbose = False,
) -> None:
    """Check ffmpeg, torch, GPUs, the preset's engine set-up and disk space; say how to fix problems."""
    from avatarcli import doctor

    setup_logging(verbose, as_json, log_file)

    resolved = presets.resolve(preset, presets.parse_set(set_ or [])) if preset or set_ else None
    checks = doctor.run_checks(preset=resolved.preset if resolved else None,
                               jobs_dir=Path.cwd())
    echo(doctor.to_json(checks) if as_json else doctor.format_text(checks))
    code = doctor.exit_code(checks)
    if code:
        raise typer.Exit(code)


