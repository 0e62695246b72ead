"""The `avatar` application: its commands live one per module beside this one."""

from __future__ import annotations

from typing import Annotated

import typer

from avatarcli import __version__
from avatarcli.cli.common import echo, standard_streams

app = typer.Typer(
    name="avatar", add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Speech recording + one portrait -> a verified talking-avatar video.",
)
presets_app = typer.Typer(help="List and show presets.", invoke_without_command=True,
                          rich_markup_mode=None)
app.add_typer(presets_app, name="presets")

def _version(value: bool) -> None:
    if value:
        echo(f"avatarcli {__version__}")
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
