"""What every ``sureserve`` command is made of: a flag for every setting, generated from
``Settings`` (``with_settings``: a flag, its env var and its help are one field), the
option types the commands share, and the consoles. ``cli.py`` (the commands) and
``bench/cli.py`` (the ``bench`` group) both build on it."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from sureserve.settings import GROUPS, Settings

err = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])
ALIASES = {"attn_implementation": ("--attn",), "max_new_tokens": ("-n",),
           "drift_reference": ("--reference",)}


def _flag(name: str) -> inspect.Parameter:
    """A CLI option for one Settings field: None when not given, so env and default apply."""
    kind: Any = Settings.model_fields[name].annotation
    if isinstance(kind, types.UnionType):  # X | None: the flag is X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    flag_type: Any = str if typing.get_origin(kind) is typing.Literal else kind
    dashed = "--" + name.replace("_", "-")
    decls = (f"{dashed}/--no-{dashed[2:]}",) if flag_type is bool else (dashed,)
    opt = typer.Option(*decls, *ALIASES.get(name, ()), help=Settings.help(name),
                       show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[flag_type | None, opt])


def with_settings(*groups: str) -> Callable[[F], F]:
    """Give a command a flag for every setting in ``groups`` (group names, or single
    setting names); it receives them validated, together with the environment, as
    ``settings``."""
    names = [n for g in groups for n in GROUPS.get(g, (g,))]
    if unknown := [n for n in names if n not in Settings.model_fields]:
        raise ValueError(f"with_settings: {unknown} are neither groups nor settings")

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != "settings"]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in names}
            return fn(*args, settings=Settings.build(**given), **kwargs)

        full = sig.replace(parameters=params + [_flag(n) for n in names])
        command.__signature__ = full  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in full.parameters.values()}
        return command  # type: ignore[return-value]

    return wrap


ModelArg = Annotated[str, typer.Argument(help="Zoo alias, folder or hub id.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Zoo alias, folder or hub id.")]
TaskOpt = Annotated[str | None, typer.Option("--task", help="embed, classify, rerank, sparse or "
                                              "generate (default: inferred from the config).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Pinned hub revision.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
InputOpt = Annotated[Path | None, typer.Option("--input", "-i", help=".txt, .jsonl, .csv or "
                                               ".parquet file.")]
FieldOpt = Annotated[str, typer.Option(help="JSONL field, CSV or Parquet column.")]
TextsArg = Annotated[list[str] | None, typer.Argument(help="Texts (or use --input / stdin).")]


GenModel = Annotated[str, typer.Option("--model", "-m", help="Zoo alias, folder or hub id of "
                                       "a causal language model.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k likeliest tokens (0 = off).")]
RepOpt = Annotated[float, typer.Option("--repetition-penalty", help="> 1 discourages repeats.")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable, "
                                                   "not included in the output).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Makes sampling reproducible.")]
FreqOpt = Annotated[float, typer.Option("--frequency-penalty", help="OpenAI's (-2..2): a "
                                        "token loses this per time it was generated.")]
PresOpt = Annotated[float, typer.Option("--presence-penalty", help="OpenAI's (-2..2): a token "
                                        "loses this once it was generated.")]


def report(message: str) -> None:
    """A progress or result line, on stderr (stdout carries the data)."""
    err.print(message, highlight=False)
