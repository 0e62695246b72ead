"""One error family for the core; the CLI maps each class to a fixed exit code."""

from __future__ import annotations

import errno


class AvatarError(Exception):
    """Base of every error the core raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(AvatarError):
    """Bad input or usage: a missing or unreadable file, an invalid preset or option."""

    exit_code = 2


class EngineError(AvatarError):
    """An engine failed to render a part, or a part/the output failed verification."""

    exit_code = 3


class OutOfMemoryError(EngineError):
    """The engine ran out of (GPU) memory."""

    exit_code = 4


class EnvironmentProblem(AvatarError):
    """This machine, not the input: a full disk or quota, a read-only or unwritable folder,
    a broken ffmpeg, the host out of memory. Nothing is wrong with the job; once the cause
    is fixed, rerunning the same command resumes it."""

    exit_code = 74  # EX_IOERR


class BusyError(AvatarError):
    """Another live process holds the job."""

    exit_code = 75


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
        self.exit_code = 128 + signum
