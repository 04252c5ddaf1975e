"""Weight layout for decoding on a CPU, chosen by measurement.

A decode step multiplies one row per sequence (M = 1..32) by every weight matrix of the
model, so it is bound by how fast the GEMM kernel streams the weights from memory. With
``nn.Linear``'s row-major ``(out, in)`` weight, ``F.linear`` asks the CPU's GEMM for
``x @ W.T``; on the CPUs measured here that transposed-operand path reads smollm2's lm_head
(49,152 x 576, 113 MB) at roughly half the memory speed the same product reaches with the
weight stored column-major (``W.T`` contiguous): BENCHMARKS.md "Generation: decode
kernels". Which is faster depends on the CPU, the BLAS build and the shape, so it is
measured here, per distinct weight shape, at 1 row and at a full batch of rows, on enough
copies of the matrix that they cannot sit in the caches (a decode step streams the whole
model), and a shape moves to column-major only when that is faster at one row and no
slower for the batch.

Off by default (the ``decode_weight_layout`` setting): measured end to end, the per-shape
gains have not yet added up to a decode speed-up (BENCHMARKS.md). The values are the same
tensors re-laid once at load (no extra copy is kept), and
``F.linear`` still runs the model: only the memory order of the weight changes. Float
results can differ from the row-major kernel's in the last bits, so greedy outputs are
compared with plain ``transformers`` generation in the tests (near-ties only) and in
``sureserve bench generate``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("sureserve.generate")

#: bytes of copies a shape is timed over, so that it streams from memory as in a real step
STREAM_BYTES = 96 * 2**20
#: column-major must beat row-major at one row by this much to be chosen (noise margin)
MIN_GAIN = 1.05
#: rows of the "full batch" timing; column-major may not be slower there
BATCH_ROWS = 32


@dataclass
class ShapeChoice:
    shape: tuple[int, int]  # (out, in)
    layers: int
    row_major_ms: tuple[float, float]  # (1 row, BATCH_ROWS rows)
    col_major_ms: tuple[float, float]
    column_major: bool

    def describe(self) -> str:
        gain = self.row_major_ms[0] / max(self.col_major_ms[0], 1e-9)
        return (f"{self.shape[0]}x{self.shape[1]} x{self.layers}: "
                f"{'column' if self.column_major else 'row'}-major "
                f"(column-major {gain:.2f}x at 1 row)")


@dataclass
class LayoutPlan:
    """What runs, for ``/info`` and the plan: the path and why."""

    path: str  # "measured" | "unchanged: <why>"
    shapes: list[ShapeChoice] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def moved(self) -> int:
        return sum(c.layers for c in self.shapes if c.column_major)

    def describe(self) -> str:
        if not self.shapes:
            return f"decode weight layout {self.path}"
        return (f"decode weight layout measured in {self.seconds:.1f}s: {self.moved} linear "
                "layers column-major; " + "; ".join(c.describe() for c in self.shapes))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "column_major_layers": self.moved,
                "seconds": round(self.seconds, 2),
                "shapes": [{"shape": list(c.shape), "layers": c.layers,
                            "row_major_ms": [round(x, 4) for x in c.row_major_ms],
                            "col_major_ms": [round(x, 4) for x in c.col_major_ms],
                            "column_major": c.column_major} for c in self.shapes]}


def measure_shape(out_f: int, in_f: int, dtype: Any, stream_bytes: int = STREAM_BYTES
                  ) -> tuple[tuple[float, float], tuple[float, float]]:
    """(row-major ms, column-major ms), each at (1 row, BATCH_ROWS rows), per matrix, over
    copies of the matrix that add up to ``stream_bytes`` (so that it streams from memory,
    as in a decode step, instead of sitting in the caches)."""
    import torch
    import torch.nn.functional as F

    from sureserve.loading.machine import best_ms

    size = out_f * in_f * torch.tensor([], dtype=dtype).element_size()
    copies = max(1, stream_bytes // size)
    rows = [torch.empty(out_f, in_f, dtype=dtype).uniform_(-1, 1) for _ in range(copies)]
    cols = [torch.empty(in_f, out_f, dtype=dtype).uniform_(-1, 1).t() for _ in range(copies)]
    result = []
    for ws in (rows, cols):
        per = []
        for m in (1, BATCH_ROWS):
            x = torch.randn(m, in_f).to(dtype)

            def run(ws: list[Any] = ws, x: Any = x) -> None:
                for w in ws:
                    F.linear(x, w)
            per.append(best_ms(run, 3) / copies)
        result.append((per[0], per[1]))
    return result[0], result[1]


def _measured(home: Path | None, o: int, i: int, dtype: Any) -> tuple[tuple[float, float],
                                                                      tuple[float, float]]:
    """``measure_shape``, cached per machine (``machine.measured_once``)."""
    from sureserve.loading.machine import measured_once

    def parse(v: Any) -> tuple[tuple[float, float], tuple[float, float]]:
        row, col = v
        return (float(row[0]), float(row[1])), (float(col[0]), float(col[1]))

    return measured_once(home, "layout", f"{o}x{i}:{str(dtype).removeprefix('torch.')}",
                         lambda: [list(x) for x in measure_shape(o, i, dtype)], parse)


def plan_and_apply(model: Any, device: str, home: Path | None = None,
                   enabled: bool = True) -> LayoutPlan:
    """Measure each distinct Linear weight shape of ``model`` (cached under ``home``) and
    re-lay the weights where column-major is faster (CPU only; tied embeddings follow
    their lm_head)."""

    done = getattr(model, "_sureserve_layout", None)
    if isinstance(done, LayoutPlan):  # a second engine on the same model: laid out once
        return done
    plan = _plan(model, device, home, enabled)
    model._sureserve_layout = plan
    return plan


def _plan(model: Any, device: str, home: Path | None, enabled: bool) -> LayoutPlan:
    import torch

    if not enabled:
        return LayoutPlan("unchanged: turned off (decode_weight_layout = false)")
    if not str(device).startswith("cpu"):
        return LayoutPlan("unchanged: not a CPU (the GPU's GEMMs read either layout)")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and type(m.weight) is torch.nn.Parameter and m.weight.dim() == 2
               and m.weight.is_contiguous() and m.weight.dtype in (torch.float32,
                                                                   torch.bfloat16)]
    if not linears:
        return LayoutPlan("unchanged: no plain Linear weights (quantized or offloaded)")
    started = time.perf_counter()
    by_shape: dict[tuple[int, int, Any], list[tuple[str, Any]]] = {}
    for name, mod in linears:
        key = (int(mod.weight.shape[0]), int(mod.weight.shape[1]), mod.weight.dtype)
        by_shape.setdefault(key, []).append((name, mod))
    plan = LayoutPlan("measured")
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for (o, i, dtype), mods in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        row, col = _measured(home, o, i, dtype)
        chosen = choose((row, col))
        plan.shapes.append(ShapeChoice((o, i), len(mods), row, col, chosen))
        if chosen:
            for _, mod in mods:
                _to_column_major(mod, embed)
    plan.seconds = time.perf_counter() - started
    log.info("%s", plan.describe())
    return plan


def choose(measured: tuple[tuple[float, float], tuple[float, float]]) -> bool:
    """Column-major when it is faster at one row (by MIN_GAIN) and no slower for a batch."""
    row, col = measured
    return row[0] >= col[0] * MIN_GAIN and col[1] <= row[1] * MIN_GAIN


def _to_column_major(mod: Any, embed: Any) -> None:
    """Same values, column-major memory; a tied input embedding shares the new tensor (an
    embedding lookup reads one strided row per token: negligible)."""
    import torch

    old = mod.weight
    new = torch.nn.Parameter(old.detach().t().contiguous().t(), requires_grad=False)
    if embed is not None and embed.weight is old:
        embed.weight = new
    mod.weight = new
