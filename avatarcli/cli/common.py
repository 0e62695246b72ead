"""What every command shares: output that survives closed pipes, error-to-exit-code mapping,
logging (stderr and a JSON-lines file), signals, progress bars, and the options that several
commands declare alike."""

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

from avatarcli.errors import (
    AvatarError,
    EnvironmentProblem,
    ExitStatus,
    InputError,
    Interrupted,
    from_os_error,
)
from avatarcli.options import Preset
from avatarcli.pipeline import Events

if TYPE_CHECKING:
    from avatarcli.ray_executor import RayExecutor

log = logging.getLogger("avatarcli")
F = TypeVar("F", bound=Callable[..., Any])


def printable(text: str) -> str:
    # File names that are not valid UTF-8 arrive as lone surrogates: show them escaped.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def err(message: str) -> None:
    from tqdm import tqdm

    for line in message.splitlines() or [""]:
        with contextlib.suppress(OSError, ValueError):  # stderr closed or a broken pipe
            tqdm.write(printable(f"avatar: {line}"), file=sys.stderr)


def echo(text: str, nl: bool = True) -> None:
    """A line on stdout. A reader that went away (`| head -1`, a closed stdout) is not a
    failure of the job: the rest of stdout goes nowhere."""
    try:
        typer.echo(printable(text), nl=nl)
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
                err(f"  {line}" if line.startswith((" ", "\t")) else f"error: {line}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err("error: interrupted (SIGINT); rerun the same command to resume")
            raise typer.Exit(ExitStatus.interrupted(signal.SIGINT)) from None
        except (typer.Exit, typer.Abort):
            raise
        except MemoryError:
            err("error: this machine ran out of memory (a problem of this machine, not of "
                 "the input; rerun the same command to resume)")
            raise typer.Exit(ExitStatus.ENVIRONMENT) from None
        except OSError as exc:  # a full disk, a read-only folder: the environment, not a bug
            known = from_os_error(exc)
            if known is None:
                _internal(exc)
            err(f"error: {known}")
            raise typer.Exit(known.exit_code) from None
        except Exception as exc:  # a bug: one line for cron, the traceback for the log file
            _internal(exc)

    return wrapper  # type: ignore[return-value]


def _internal(exc: BaseException) -> NoReturn:
    with contextlib.suppress(Exception):  # the log file itself may be what failed
        log.debug("internal error", exc_info=exc)
    err(f"error: internal error: {type(exc).__name__}: {exc} (a bug; rerun with -v "
         f"or --log-file for the traceback)")
    raise typer.Exit(ExitStatus.INTERNAL) from None


def _on_sigterm(signum: int, frame: object) -> None:
    # Raised in the main thread: the runner stops its batch processes, the job is saved.
    raise Interrupted("interrupted (SIGTERM); rerun the same command to resume", signum)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        with contextlib.suppress(OSError, ValueError):  # stderr gone: nowhere to say it
            tqdm.write(printable(self.format(record)), file=sys.stderr)


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


def setup_logging(verbose: bool, quiet: bool, log_file: Path | None = None) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("avatar: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root = logging.getLogger("avatarcli")
    root.handlers[:] = [handler]
    if log_file is not None:
        root.addHandler(_JsonLinesHandler(log_file))
    root.setLevel(logging.DEBUG if verbose or log_file else handler.level)
    root.propagate = False


def record_event(message: str, **fields: Any) -> None:
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


def parse_face(value: str | None) -> tuple[int, int, int, int] | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", value)
    if not m or int(m.group(3)) < 8 or int(m.group(4)) < 8:
        raise InputError(f"--face {value!r}: expected X,Y,W,H in image pixels (W,H >= 8)")
    x, y, w, h = (int(g) for g in m.groups())
    return x, y, w, h


def check_line(figures: dict[str, Any]) -> str:
    lag = figures.get("lag_frames")
    sync = (f"lag {lag:+d} frame(s), correlation {figures.get('sync_corr')}" if lag is not None
            else f"lag unknown ({figures.get('sync_reason')})")
    verdict = "all checks hold" if figures.get("ok") else f"failed: {', '.join(figures['failed'])}"
    return (f"{verdict}; {sync}; largest seam jump {figures.get('seam_max_ratio')}x the median "
            f"change; longest frozen run {figures.get('frozen_longest_frames')} frames")


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


@contextlib.contextmanager
def executor_for(kind: str, address: str, preset: Preset | None, paths: list[Path],
                 outputs: list[Path], gpus: str | None) -> Iterator[RayExecutor | None]:
    """None for local batch processes (or nothing to run: `preset` None); a Ray executor
    whose nodes all see `paths`, shut down when the block ends."""
    if kind not in ("local", "ray"):
        raise InputError(f"--executor {kind!r}: expected local or ray")
    if kind == "local" or preset is None:
        yield None
        return
    if gpus:
        raise InputError("--gpus does not go with --executor ray: Ray gives each batch its GPUs")
    from avatarcli.ray_executor import RayExecutor

    executor = RayExecutor.for_preset(preset, address)
    try:
        # Shared storage is the contract: every node must see the inputs, outputs and Python.
        executor.check_shared_paths([*paths, Path(sys.executable)], writable=outputs)
        yield executor
    finally:
        executor.shutdown()


def start(verbose: bool, quiet: bool, log_file: Path | None) -> None:
    """What a rendering command does first: logging to stderr (and the log file), and
    SIGTERM turned into a clean, resumable stop."""
    setup_logging(verbose, quiet, log_file)
    install_signal_handlers()


def overrides(set_: list[str] | None, no_check: bool) -> list[str]:
    """--set items, with --no-check as the `check` key."""
    return [*(set_ or []), *(["check=false"] if no_check else [])]


def preset_ref(preset: str | None, gpus: str | None) -> str | None:
    """`-p auto`: the best built-in preset whose memory estimate fits the visible GPUs."""
    if preset != "auto":
        return preset
    from avatarcli import gpus as gpu_info
    from avatarcli.engines.liveavatar import fit

    facts = gpu_info.facts()
    if gpus:
        wanted = gpu_info.parse_list(gpus)
        facts = [f for f in facts if f.index in wanted]
    name, why = fit.auto_preset(facts, gpu_info.host_memory_gb())
    err(f"preset auto: {name} ({why})")
    return name


def show_bar(quiet: bool) -> bool:
    # Bars only for a person at a terminal; never in cron, pipes or with --quiet/--json.
    return not quiet and sys.stdout.isatty() and sys.stderr.isatty()


