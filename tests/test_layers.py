"""The layers point one way, and no module imports itself back in a circle.

Read from the source (every ``import``, those inside functions too; not the ones under
``if TYPE_CHECKING:``, which never run), so a lazy import cannot hide a climb. ``from pkg
import sub`` counts as an import of ``pkg.sub``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: lowest first; a module may import its own layer and the ones below. Matched by the
#: longest prefix, so ``sureserve.loading.precision`` sits below ``sureserve.loading``.
LAYERS: list[tuple[str, ...]] = [
    # facts and vocabulary everything shares: the error tree, the version, text readers
    # and result writers,
    # the pure batch planner, what each precision/quantization method is
    ("sureserve.errors", "sureserve.version", "sureserve.textio", "sureserve.writers",
     "sureserve.batching", "sureserve.vectors",
     "sureserve.loading.precision"),
    ("sureserve.settings",),
    ("sureserve.zoo",),
    ("sureserve.loading",),
    # what runs on a loaded model
    ("sureserve.gate", "sureserve.tasks", "sureserve.watch", "sureserve.generation"),
    ("sureserve.engine",),
    ("sureserve.api", "sureserve"),  # the public API (``sureserve/__init__.py``)
    # the services built on it
    ("sureserve.jobs", "sureserve.server", "sureserve.quantize", "sureserve.doctor",
     "sureserve.ray", "sureserve.clikit", "sureserve.zoo.cli", "sureserve.jobcli"),
    ("sureserve.bench",),
    ("sureserve.cli",),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (SRC / "sureserve").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
            out |= subs
            if len(subs) < len(node.names):
                out.add(node.module)
    return {m for m in out if m in mods}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, mods) - {name} for name, path in mods.items()}


def layer(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            # "sureserve" (the package's __init__) names only itself
            inside = module.startswith(p + ".") and p != "sureserve"
            if (module == p or inside) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module} is in no layer: add it to LAYERS"
    return found


def test_every_import_points_down_or_sideways() -> None:
    climbs = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, bs in sorted(_graph().items()) for b in sorted(bs) if layer(b) > layer(a)]
    assert not climbs, "\n".join(climbs)


def test_production_code_never_imports_the_benchmarks() -> None:
    bad = [f"{a} imports {b}" for a, bs in sorted(_graph().items()) for b in bs
           if b.startswith("sureserve.bench") and not a.startswith(("sureserve.bench",
                                                                      "sureserve.cli"))]
    assert not bad, bad


def test_no_import_circles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_check_sees_a_climb_and_a_circle(tmp_path: Path) -> None:
    """The reader itself: a lazy import inside a function counts, TYPE_CHECKING ones don't,
    and ``from pkg import sub`` names the submodule."""
    mods = {"sureserve.loading.x": tmp_path / "x.py", "sureserve.server": tmp_path / "s.py",
            "sureserve.gate": tmp_path / "g.py", "sureserve.gate.report": tmp_path / "r.py"}
    src = tmp_path / "x.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    import sureserve.gate\n"
                   "def f():\n    from sureserve import server\n"
                   "    from sureserve.gate import report\n")
    assert _imports(src, mods) == {"sureserve.server", "sureserve.gate.report"}
    assert layer("sureserve.server.app") > layer("sureserve.loading.x")
    assert layer("sureserve.loading.precision") < layer("sureserve.settings")
    with pytest.raises(AssertionError, match="in no layer"):
        layer("sureserve.newthing")
