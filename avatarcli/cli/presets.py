"""`avatar presets` and `avatar presets show`."""

from __future__ import annotations

from typing import Annotated

import typer

from avatarcli import presets
from avatarcli.cli.app import presets_app
from avatarcli.cli.common import echo, handle_errors


@presets_app.callback()
@handle_errors
def presets_list(ctx: typer.Context) -> None:
    """List presets: name, engine, size, description, where it came from."""
    if ctx.invoked_subcommand is not None:
        return
    rows = [presets.describe(info) for info in presets.available().values()]
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        echo(f"{r['name']:<{width}}  {r['engine']:<10}  {r['size']:<9}  "
                   f"{r['description']}  [{r['origin']}]")
    echo(f"(user presets: {presets.user_dir()})")


@presets_app.command("show")
@handle_errors
def presets_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Preset name or YAML file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                   help="Override a key, as in gen.")] = None,
) -> None:
    """Print the fully resolved preset as YAML."""
    resolved = presets.resolve(name, presets.parse_set(set_ or []))
    echo(f"# {resolved.name} ({resolved.origin})")
    echo(presets.to_yaml(resolved.preset), nl=False)


