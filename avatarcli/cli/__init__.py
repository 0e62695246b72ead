"""The command line: parses, validates, prints; all work happens in the core modules.
One module per command; `common` holds what they share."""

from avatarcli.cli import batch, check, doctor, gen, plan, presets  # noqa: F401  (registers them)
from avatarcli.cli.app import app, main

__all__ = ["app", "main"]
