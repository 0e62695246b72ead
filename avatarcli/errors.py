"""One error family for the core; the CLI maps each class to a fixed exit code."""

from __future__ import annotations


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


class BusyError(AvatarError):
    """Another live process holds the job."""

    exit_code = 75


class Interrupted(AvatarError):
    """Stopped by a signal; the job can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
