"""``sureserve models`` and ``sureserve zoo build``: list the packaged zoo, build it now."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from sureserve.clikit import JsonOpt, err, out, with_settings
from sureserve.errors import ModelSourceError
from sureserve.settings import Settings

zoo_app = typer.Typer(no_args_is_help=True, help="Build or inspect the packaged model zoo.")


@with_settings("source")
def models(settings: Settings, as_json: JsonOpt = False) -> None:
    """List the packaged model zoo."""
    from rich.table import Table

    from sureserve.zoo import DEFAULT_MODEL, ZOO

    rows: list[dict[str, Any]] = [
        {"name": e.name, "task": e.task_name, "default": e.name == DEFAULT_MODEL,
         "ready": e.is_ready(settings), "package": e.package, "description": e.description}
        for e in ZOO.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table("alias", "task", "ready", "from package", "description")
    for r in rows:
        t.add_row(r["name"] + (" (default)" if r["default"] else ""), r["task"],
                  "yes" if r["ready"] else "built on first use", r["package"], r["description"])
    out.print(t)


@zoo_app.command("build")
@with_settings("source")
def zoo_build(settings: Settings, names: Annotated[list[str] | None, typer.Argument(
        help="Aliases (default: all but the on-demand ones, e.g. qwen-coder).")] = None,
              corpora: Annotated[bool, typer.Option(help="Also fetch the corpora.")] = True
              ) -> None:
    """Build zoo entries and fetch corpora now, instead of on first use."""
    from sureserve.zoo import ZOO
    from sureserve.zoo.corpora import bbc_dir, vader_dir

    if corpora:
        err.print(f"corpora: vader at {vader_dir(settings)}, bbc at {bbc_dir()}")
    for name in names or [n for n, e in ZOO.items() if not e.on_demand]:
        if name not in ZOO:
            raise ModelSourceError(f"unknown zoo alias {name!r}", f"use one of {', '.join(ZOO)}")
        err.print(f"{name}: {ZOO[name].path(settings)}")
