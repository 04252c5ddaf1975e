"""The top-level Python API: ``load`` and ``info``."""

from __future__ import annotations

from typing import Any

from sureserve.engine import Engine
from sureserve.loading import loader
from sureserve.loading.describe import describe
from sureserve.settings import Settings


def load(
    identifier: str,
    task: str | None = None,
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    *,
    tokenizer: str | None = None,
    settings: Settings | None = None,
    **overrides: Any,
) -> Engine:
    """Load a model and its tokenizer from one identifier, ready to run.

    ``identifier``: a zoo alias (see ``sureserve models``), a local folder, or a hub id
    already in the local Hugging Face cache (``revision`` pins it). ``task`` is inferred
    from the config when omitted. ``tokenizer`` names another tokenizer source explicitly
    (reported loudly). Any other ``Settings`` field can be passed as a keyword.
    """
    base = settings.model_dump() if settings else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if device is not None:
        base["device"] = device
    if dtype is not None:
        base["dtype"] = dtype
    s = Settings.build(**base)
    loaded = loader.load(identifier, task=task, revision=revision, settings=s, tokenizer=tokenizer)
    return Engine(loaded, s)


def info(identifier: str, task: str | None = None, revision: str | None = None,
         **overrides: Any) -> dict[str, Any]:
    """The load plan and model facts, without loading the weights."""
    return describe(identifier, task, revision, Settings.build(**overrides))
