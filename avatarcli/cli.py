"""The command line: parses, validates, prints. All work happens in the core modules."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from avatarcli import __version__, presets
from avatarcli.check import Thresholds
from avatarcli.errors import (
    AvatarError,
    EnvironmentProblem,
    ExitStatus,
    InputError,
    Interrupted,
    from_os_error,
)
from avatarcli.options import Preset
from avatarcli.pipeline import Events, Result, generate

if TYPE_CHECKING:
    from avatarcli.ray_executor import RayExecutor

app = typer.Typer(
    name="avatar", add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Speech recording + one portrait -> a verified talking-avatar video.",
)
presets_app = typer.Typer(help="List and show presets.", invoke_without_command=True,
                          rich_markup_mode=None)
app.add_typer(presets_app, name="presets")

log = logging.getLogger("avatarcli")
F = TypeVar("F", bound=Callable[..., Any])
_CHECK = Thresholds()  # `avatar check` option defaults


def _printable(text: str) -> str:
    # File names that are not valid UTF-8 arrive as lone surrogates: show them escaped.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _err(message: str) -> None:
    from tqdm import tqdm

    for line in message.splitlines() or [""]:
        with contextlib.suppress(OSError, ValueError):  # stderr closed or a broken pipe
            tqdm.write(_printable(f"avatar: {line}"), file=sys.stderr)


def _echo(text: str, nl: bool = True) -> None:
    """A line on stdout. A reader that went away (`| head -1`, a closed stdout) is not a
    failure of the job: the rest of stdout goes nowhere."""
    try:
        typer.echo(_printable(text), nl=nl)
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _stdout_to_devnull()
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    # Python flushes stdout at exit; pointing fd 1 at /dev/null keeps that flush quiet.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def standard_streams() -> None:
    """Make fds 0-2 valid and sys.stdout/sys.stderr usable whatever the caller left us.

    A closed fd 1 or 2 (`>&-`, `2>&-`) would otherwise be reused by the next file opened
    (the job's lock or manifest would receive our output), and a missing sys.stderr makes
    tqdm and logging fall back to stdout, breaking `--json`.
    """
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, mode)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(fd, "w", encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                                    closefd=False, buffering=1))
        else:
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors="backslashreplace")


def handle_errors(func: F) -> F:
    """Turn the core's errors into one message per problem on stderr and a fixed exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AvatarError as exc:
            # One line per problem; a log tail that follows a failure is indented under it.
            for line in str(exc).splitlines():
                _err(f"  {line}" if line.startswith((" ", "\t")) else f"error: {line}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _err("error: interrupted (SIGINT); rerun the same command to resume")
            raise typer.Exit(ExitStatus.interrupted(signal.SIGINT)) from None
        except (typer.Exit, typer.Abort):
            raise
        except MemoryError:
            _err("error: this machine ran out of memory (a problem of this machine, not of "
                 "the input; rerun the same command to resume)")
            raise typer.Exit(ExitStatus.ENVIRONMENT) from None
        except OSError as exc:  # a full disk, a read-only folder: the environment, not a bug
            known = from_os_error(exc)
            if known is None:
                _internal(exc)
            _err(f"error: {known}")
            raise typer.Exit(known.exit_code) from None
        except Exception as exc:  # a bug: one line for cron, the traceback for the log file
            _internal(exc)

    return wrapper  # type: ignore[return-value]


def _internal(exc: BaseException) -> NoReturn:
    with contextlib.suppress(Exception):  # the log file itself may be what failed
        log.debug("internal error", exc_info=exc)
    _err(f"error: internal error: {type(exc).__name__}: {exc} (a bug; rerun with -v "
         f"or --log-file for the traceback)")
    raise typer.Exit(ExitStatus.INTERNAL) from None


def _on_sigterm(signum: int, frame: object) -> None:
    # Raised in the main thread: the runner stops its batch processes, the job is saved.
    raise Interrupted("interrupted (SIGTERM); rerun the same command to resume", signum)


def _install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        with contextlib.suppress(OSError, ValueError):  # stderr gone: nowhere to say it
            tqdm.write(_printable(self.format(record)), file=sys.stderr)


class _JsonLinesHandler(logging.Handler):
    """--log-file: one JSON object per line, appended, for machines (cron, log shippers)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.broken = False
        try:
            self.stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives with the handler)
        except OSError as exc:
            known = from_os_error(exc)
            if isinstance(known, EnvironmentProblem):
                raise EnvironmentProblem(f"{path}: cannot open log file ({exc.strerror}); "
                                         f"a problem of this machine") from exc
            raise InputError(f"{path}: cannot open log file ({exc.strerror})") from exc

    def emit(self, record: logging.LogRecord) -> None:
        if self.broken:
            return
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
                 "level": record.levelname.lower(), "pid": record.process,
                 "message": record.getMessage(), **getattr(record, "fields", {})}
        try:
            self.stream.write(json.dumps(entry, default=str) + "\n")
            self.stream.flush()
        except OSError as exc:  # a full disk: say so once, as the environment's fault
            self.broken = True
            raise EnvironmentProblem(f"{self.path}: cannot write the log file "
                                     f"({exc.strerror}); a problem of this machine, not of "
                                     f"the input; rerun the same command to resume") from exc


def _setup_logging(verbose: bool, quiet: bool, log_file: Path | None = None) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("avatar: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root = logging.getLogger("avatarcli")
    root.handlers[:] = [handler]
    if log_file is not None:
        root.addHandler(_JsonLinesHandler(log_file))
    root.setLevel(logging.DEBUG if verbose or log_file else handler.level)
    root.propagate = False


def _record(message: str, **fields: Any) -> None:
    """An INFO line for the log file with machine-readable fields (and stderr unless quiet)."""
    log.info(message, extra={"fields": fields})


class CliEvents(Events):
    def __init__(self, *, bar: bool, quiet: bool, position: int = 0, label: str = "rendering",
                 ) -> None:
        self.bar = bar
        self.quiet = quiet
        self.position = position
        self.label = label

    def warn(self, message: str) -> None:
        log.warning("warning: %s", message)

    def info(self, message: str) -> None:
        log.info("%s", message)

    @contextlib.contextmanager
    def progress(self, total_frames: int, done_frames: int) -> Iterator[Any]:
        from tqdm import tqdm

        with tqdm(total=total_frames, initial=done_frames, unit="frame", desc=self.label,
                  disable=not self.bar, dynamic_ncols=True, file=sys.stderr,
                  smoothing=0.05, position=self.position, leave=self.position == 0) as bar:
            yield bar


def _parse_face(value: str | None) -> tuple[int, int, int, int] | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", value)
    if not m or int(m.group(3)) < 8 or int(m.group(4)) < 8:
        raise InputError(f"--face {value!r}: expected X,Y,W,H in image pixels (W,H >= 8)")
    x, y, w, h = (int(g) for g in m.groups())
    return x, y, w, h


def _check_line(figures: dict[str, Any]) -> str:
    lag = figures.get("lag_frames")
    sync = (f"lag {lag:+d} frame(s), correlation {figures.get('sync_corr')}" if lag is not None
            else f"lag unknown ({figures.get('sync_reason')})")
    verdict = "all checks hold" if figures.get("ok") else f"failed: {', '.join(figures['failed'])}"
    return (f"{verdict}; {sync}; largest seam jump {figures.get('seam_max_ratio')}x the median "
            f"change; longest frozen run {figures.get('frozen_longest_frames')} frames")


def _print_plan(result: Result) -> None:
    _echo(f"plan: {result.duration_s:.2f} s of audio -> {result.frames} frames at "
               f"{result.fps} fps, {result.width}x{result.height}, preset {result.preset} "
               f"(engine {result.engine}), {len(result.batches)} batch(es)")
    _echo(f"output: {result.output}")
    _echo(f"job dir: {result.job_dir}")
    for b in result.batches:
        _echo(f"  batch {b.index:4d}: frames {b.frame_start}-{b.frame_end - 1} "
                   f"({b.frame_end - b.frame_start}), {b.start_s:.2f}-{b.end_s:.2f} s, "
                   f"{b.clips} clip(s)")
        if b.command:
            _echo(f"    {b.command}")


LogFile = Annotated[Path | None, typer.Option("--log-file", metavar="FILE",
                                              help="Append structured (JSON lines) logs here.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or info, only warnings and errors.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout, nothing else.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging (commands run).")]
PresetOpt = Annotated[str | None, typer.Option("-p", "--preset",
                                               help="Preset name or YAML file, or 'auto' (the best that fits the GPUs) [default: cpu-preview].")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                  help="Override a preset key (section.key for sections); repeatable.")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, max=64, help="Batch processes at once.")]
GpusOpt = Annotated[str | None, typer.Option("--gpus", metavar="IDS",
                                             help="GPU ids for model engines, e.g. 0,2,3 [default: all visible].")]
KeepParts = Annotated[bool, typer.Option("--keep-parts", help="Keep the job directory after success.")]
ExecutorOpt = Annotated[str, typer.Option("--executor", metavar="local|ray",
                                          help="Where batch processes run: this machine, or a Ray cluster.")]
NoCheck = Annotated[bool, typer.Option("--no-check",
                                       help="Do not run avatar check on the finished video (model engines).")]
RayAddress = Annotated[str, typer.Option("--ray-address", metavar="ADDRESS",
                                         help="Ray cluster: auto, ray://host:port, or local (an in-process cluster).")]


def _executor(kind: str, address: str, preset: Preset, paths: list[Path], outputs: list[Path],
              gpus: str | None) -> RayExecutor | None:
    """None for local batch processes; a Ray executor whose nodes all see `paths`."""
    if kind == "local":
        return None
    if kind != "ray":
        raise InputError(f"--executor {kind!r}: expected local or ray")
    if gpus:
        raise InputError("--gpus does not go with --executor ray: Ray gives each batch its GPUs")
    from avatarcli.ray_executor import RayExecutor

    executor = RayExecutor.for_preset(preset, address)
    # Shared storage is the contract: every node must see the inputs, outputs and Python.
    executor.check_shared_paths([*paths, Path(sys.executable)], writable=outputs)
    return executor


def _preset_ref(preset: str | None, gpus: str | None) -> str | None:
    """`-p auto`: the best built-in preset whose memory estimate fits the visible GPUs."""
    if preset != "auto":
        return preset
    from avatarcli import fit
    from avatarcli import gpus as gpu_info

    facts = gpu_info.facts()
    if gpus:
        wanted = gpu_info.parse_list(gpus)
        facts = [f for f in facts if f.index in wanted]
    name, why = fit.auto_preset(facts, gpu_info.host_memory_gb())
    _err(f"preset auto: {name} ({why})")
    return name


def _show_bar(quiet: bool) -> bool:
    # Bars only for a person at a terminal; never in cron, pipes or with --quiet/--json.
    return not quiet and sys.stdout.isatty() and sys.stderr.isatty()


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
    _setup_logging(verbose, quiet or as_json, log_file)
    _install_signal_handlers()
    set_ = [*(set_ or []), *(["check=false"] if no_check else [])]
    resolved = presets.resolve(_preset_ref(preset, gpus), presets.parse_set(set_),
                               prompt=prompt)
    events = CliEvents(bar=_show_bar(quiet or as_json), quiet=quiet or as_json)
    out_dir = (output or audio).expanduser().absolute().parent
    runs_on = None if dry_run else _executor(executor, ray_address, resolved.preset,
                                             [audio.absolute(), image.absolute()], [out_dir],
                                             gpus)
    try:
        result = generate(audio, image, resolved, output=output, jobs=jobs, gpus=gpus,
                          dry_run=dry_run, force=force, keep_parts=keep_parts,
                          face=_parse_face(face), events=events, executor=runs_on)
    finally:
        if runs_on is not None:
            runs_on.shutdown()
    if as_json:
        _echo(json.dumps(result.summary(), indent=1))
    elif dry_run:
        _print_plan(result)
    elif not quiet:
        retried = [f"batch {b.index} at rung {b.rung}" for b in result.batches if b.rung]
        _echo(f"wrote {result.output} ({result.duration_s:.1f} s, {result.frames} frames, "
                   f"{result.width}x{result.height}; {len(result.batches)} batch(es): "
                   f"{len(result.rendered)} rendered, {len(result.reused)} reused) "
                   f"in {result.seconds:.1f} s")
        if retried:
            _echo(f"after out-of-memory retries: {', '.join(retried)} "
                       f"(lighter settings from the preset's oom_retry)")
        if result.telemetry.get("summary"):
            _echo(f"batches: {result.telemetry['summary']}")
        if result.check:
            _echo(f"check: {_check_line(result.check)}")
    if not dry_run:
        log.debug("done", extra={"fields": {"event": "job", "status": "done",
                                            **result.summary()}})


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
    from tqdm import tqdm

    from avatarcli import batch

    _setup_logging(verbose, quiet or as_json, log_file)
    _install_signal_handlers()
    rows = batch.load_manifest(manifest)
    preset = _preset_ref(preset, gpus)
    if no_check:
        set_ = [*(set_ or []), "check=false"]
    if preset or set_:  # a wrong -p or --set is a usage error, not a failure of every row
        presets.resolve(preset, presets.parse_set(set_ or []))
    for problem in batch.validate(rows, preset=preset, overrides=set_ or []):
        log.error("error: %s", problem)  # all of them, before anything renders
    valid = [r for r in rows if r.resolved is not None]
    runs_on = None
    if valid:
        inputs = {p.absolute() for r in valid for p in (r.audio, r.image)}
        outputs = {r.output.parent.absolute() for r in valid}
        # Each row asks for its own preset's resources (batch.py: executor.for_row); the
        # cluster is checked for the most demanding row's.
        neediest = valid[0].resolved.preset  # type: ignore[union-attr]
        if executor == "ray":
            from avatarcli.ray_executor import batch_resources

            neediest = max((r.resolved.preset for r in valid if r.resolved is not None),
                           key=lambda p: batch_resources(p)[1])
        runs_on = _executor(executor, ray_address, neediest, sorted(inputs), sorted(outputs),
                            gpus)
    if runs_on is None and rows_at_once > 1:
        raise InputError("--rows above 1 needs --executor ray (rows share this machine's cores)")
    show = _show_bar(quiet or as_json)

    with tqdm(total=len(rows), unit="video", desc="videos", disable=not show, position=0,
              file=sys.stderr, dynamic_ncols=True) as rows_bar:

        def on_result(r: batch.RowResult) -> None:
            rows_bar.update(1)
            # One summary line per job on stderr (failures even with --quiet), and the log file.
            detail = f" ({r.reason})" if r.reason else ""
            line = f"{r.status}: {r.output}{detail} in {r.seconds:.1f} s"
            if r.check:
                line += f"; check: {_check_line(r.check)}"
            if r.status in ("failed", "busy") or not quiet:
                _err(line)
            log.debug("%s", line, extra={"fields": {"event": "row", **r.to_dict()}})

        try:
            results = batch.run_batch(
                rows, redo=redo, jobs=jobs, gpus=gpus, keep_parts=keep_parts,
                row_events=lambda row: CliEvents(bar=show, quiet=quiet or as_json, position=1,
                                                 label=row.output.name),
                on_result=on_result, executor=runs_on, rows_at_once=rows_at_once)
        finally:
            if runs_on is not None:
                runs_on.shutdown()
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed", "busy")}
    if as_json:
        _echo(json.dumps({"rows": [r.to_dict() for r in results], **counts}, indent=1))
    elif not quiet:
        width = max(len(r.output) for r in results)
        for r in results:
            _echo(f"{r.status:<8} {r.output:<{width}}  {r.reason}")
        _echo(", ".join(f"{n} {s}" for s, n in counts.items()))
    code = batch.exit_code(results)
    if code:
        raise typer.Exit(code)


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
) -> None:
    """Check a finished video: streams, length, frozen or black frames, lip sync, seams.

    Exits 0 when every check holds, 5 when one fails.
    """
    from avatarcli import check

    _setup_logging(False, True)
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


@app.command("doctor")
@handle_errors
def doctor_cmd(
    preset: PresetOpt = None,
    set_: SetOpt = None,
    as_json: AsJson = False,
) -> None:
    """Check ffmpeg, torch, GPUs, the LiveAvatar set-up and disk space; say how to fix problems."""
    from avatarcli import doctor

    resolved = presets.resolve(preset, presets.parse_set(set_ or [])) if preset or set_ else None
    checks = doctor.run_checks(preset=resolved.preset if resolved else None,
                               jobs_dir=Path.cwd())
    _echo(doctor.to_json(checks) if as_json else doctor.format_text(checks))
    code = doctor.exit_code(checks)
    if code:
        raise typer.Exit(code)


@app.command("plan")
@handle_errors
def plan_cmd(
    audio: Annotated[Path | None, typer.Argument(metavar="[AUDIO]",
                                                 help="Optional recording: also plan its batches.")] = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    gpus: Annotated[int | None, typer.Option("--gpus", min=1, max=64,
                                             help="GPUs per launch [default: the preset's].")] = None,
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
) -> None:
    """Estimate a preset's peak GPU memory per card; with AUDIO, the batch plan and time."""
    from avatarcli import fit, history
    from avatarcli import gpus as gpu_info
    from avatarcli import memory as mem_model

    _setup_logging(False, as_json)
    facts = gpu_info.facts()
    resolved = presets.resolve(_preset_ref(preset, None), presets.parse_set(set_ or []))
    if fit_:
        host = host_mem if host_mem is not None else gpu_info.host_memory_gb()
        name, found = fit.lever_fit(resolved, gpus=gpus, gpu_mem_gb=gpu_mem, facts=facts,
                                    host_mem_gb=host, tflops=tflops or mem_model.GPU_TFLOPS,
                                    pcie_gib_s=pcie or mem_model.PCIE_GIB_PER_S)
        count = gpus or max(1, len(facts))
        card = gpu_mem if gpu_mem is not None else fit.smallest_card_gb(facts) or 0.0
        if as_json:
            typer.echo(json.dumps({
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
        else:
            card_only = None
            if found is None and host is not None:
                _, card_only = fit.lever_fit(resolved, gpus=gpus, gpu_mem_gb=gpu_mem,
                                             facts=facts, host_mem_gb=None,
                                             tflops=tflops or mem_model.GPU_TFLOPS,
                                             pcie_gib_s=pcie or mem_model.PCIE_GIB_PER_S)
            for line in fit.fit_lines(name, found, gpus=count, gpu_mem_gb=card,
                                      host_mem_gb=host, card_only=card_only):
                typer.echo(line)
        if found is None:
            raise typer.Exit(ExitStatus.FAILED)
        return
    if audio is not None and not audio.is_file():
        raise InputError(f"{audio}: audio file not found")
    seen = history.seen(resolved.preset, facts[0].name if facts else None)
    result = fit.memory_plan(resolved, gpus=gpus, gpu_mem_gb=gpu_mem, facts=facts, audio=audio,
                             seen=seen, host_mem_gb=host_mem if host_mem is not None
                             else gpu_info.host_memory_gb())
    if as_json:
        _echo(json.dumps(result.to_dict(), indent=1))
        return
    _echo(f"preset {result.preset} (engine {result.engine})")
    if result.estimate is None:
        _echo("  no GPU memory model for this engine (the built-in engine runs on the CPU)")
    else:
        _echo(f"  on {result.gpus} x {result.gpu_mem_gb:g} GB:")
        for line in result.estimate.lines():
            _echo(f"  {line}")
    if result.host is not None:
        for line in result.host.lines():
            _echo(f"  {line}")
    if seen:
        peak = seen.get("peak_gpu_gb")
        _echo(f"  seen on {seen['gpu']} in {seen['jobs']} earlier job(s): "
                   f"{seen['fps']} frames/s" + (f", peak {peak} GB per GPU" if peak else ""))
    if audio is not None:
        _echo(f"  {audio}: {result.duration_s:.1f} s -> {result.frames} frames in "
                   f"{len(result.batches)} batch(es)")
        for b in result.batches:
            _echo(f"    batch {b['index']:4d}: frames {b['frame_start']}-{b['frame_end'] - 1}"
                       f", {b['clips']} clip(s)")
        if result.est_seconds is not None:
            _echo(f"  estimated time: {result.est_seconds / 60:.1f} min at "
                       f"{seen['fps']} frames/s")
    if not result.fits:
        raise typer.Exit(ExitStatus.FAILED)


@presets_app.callback()
@handle_errors
def presets_list(ctx: typer.Context) -> None:
    """List presets: name, engine, size, description, where it came from."""
    if ctx.invoked_subcommand is not None:
        return
    rows = [presets.describe(info) for info in presets.available().values()]
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        _echo(f"{r['name']:<{width}}  {r['engine']:<10}  {r['size']:<9}  "
                   f"{r['description']}  [{r['origin']}]")
    _echo(f"(user presets: {presets.user_dir()})")


@presets_app.command("show")
@handle_errors
def presets_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Preset name or YAML file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                   help="Override a key, as in gen.")] = None,
) -> None:
    """Print the fully resolved preset as YAML."""
    resolved = presets.resolve(name, presets.parse_set(set_ or []))
    _echo(f"# {resolved.name} ({resolved.origin})")
    _echo(presets.to_yaml(resolved.preset), nl=False)


def _version(value: bool) -> None:
    if value:
        _echo(f"avatarcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Speech recording + one portrait -> a verified talking-avatar video."""


def main() -> None:
    standard_streams()
    app(prog_name="avatar")
