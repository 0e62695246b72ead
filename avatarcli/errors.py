"""One error family for the core, and the exit codes: `ExitStatus` is the one table of them."""

from __future__ import annotations

import errno
from enum import IntEnum


class ExitStatus(IntEnum):
    """Every exit code avatarcli uses: `avatar`'s (the README's table) and the batch process's
    (`python -m avatarcli.worker`, read by the runner). Nothing else writes a number."""

    OK = 0
    FAILED = 1  # `batch`: some rows failed; `doctor`: a check failed; `plan`: it does not fit
    INPUT = 2  # your input: a bad file, option or preset
    ENGINE = 3  # an engine or the verification failed
    OUT_OF_MEMORY = 4  # the model's (GPU) memory ran out; the runner may retry lighter
    CHECK = 5  # `avatar check`: the video failed a check
    ORPHANED = 69  # batch process only: its parent died, so it stopped (never `avatar`'s code)
    INTERNAL = 70  # EX_SOFTWARE: a bug, an error avatarcli did not expect
    ENVIRONMENT = 74  # EX_IOERR: this machine (a full disk, a broken ffmpeg), not the input
    BUSY = 75  # EX_TEMPFAIL: another live process holds the job

    @staticmethod
    def interrupted(signum: int) -> int:
        """Stopped by signal `signum` (130 for SIGINT, 143 for SIGTERM), as shells report it."""
        return 128 + signum


class AvatarError(Exception):
    """Base of every error the core raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code: int = ExitStatus.FAILED


class InputError(AvatarError):
    """Bad input or usage: a missing or unreadable file, an invalid preset or option."""

    exit_code = ExitStatus.INPUT


class EngineError(AvatarError):
    """An engine failed to render a part, or a part/the output failed verification."""

    exit_code = ExitStatus.ENGINE


class OutOfMemoryError(EngineError):
    """The engine ran out of (GPU) memory."""

    exit_code = ExitStatus.OUT_OF_MEMORY


class EnvironmentProblem(AvatarError):
    """This machine, not the input: a full disk or quota, a read-only or unwritable folder,
    a broken ffmpeg, the host out of memory. Nothing is wrong with the job; once the cause
    is fixed, rerunning the same command resumes it."""

    exit_code = ExitStatus.ENVIRONMENT


class BusyError(AvatarError):
    """Another live process holds the job."""

    exit_code = ExitStatus.BUSY


# errno values that say "this machine" rather than "your input" or "a bug".
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO",
                                      "EMFILE", "ENFILE", "ENOMEM", "EFBIG", "ENODEV")
    if hasattr(errno, name))
# errno values that say "this path, as given, cannot be used": the user's input. (ENOENT and
# the like stay bugs here: every path given is checked before anything starts.)
PATH_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ELOOP", "ENAMETOOLONG", "EILSEQ") if hasattr(errno, name))


def from_os_error(exc: OSError) -> AvatarError | None:
    """The domain error for an OSError whose cause is the environment or a bad path; None for
    anything else (which stays a bug). The message names the file and says what went wrong."""
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    message = f"{where}: {what}" if where != "" else what
    if exc.errno in ENVIRONMENT_ERRNOS:
        return EnvironmentProblem(f"{message} (a problem of this machine, not of the input; "
                                  f"fix it and rerun the same command to resume)")
    if exc.errno in PATH_ERRNOS:
        return InputError(message)
    return None


class Interrupted(AvatarError):
    """Stopped by a signal; the job can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = ExitStatus.interrupted(signum)
