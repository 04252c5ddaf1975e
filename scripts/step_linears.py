"""One decode step's linear layers at 1, 8 and 32 rows with every layer's weights streamed
from memory, against the same product on one weight that stays in cache (BENCHMARKS.md
"Generation: where a shared prefix's time goes", issue #24). What it shows: how much of the
CPU's fp32 rate a step's M-row products reach when the weights do not fit in cache, i.e.
whether weight streaming is hidden behind the arithmetic.

smollm2's shapes (30 layers of q, k, v, o, gate, up, down; lm_head left out), random
weights: `F.linear`, oneDNN's packed linear (`mkldnn._reorder_linear_weight`, packed for
the row count, what sureserve's packed layers run) and sureserve's own decode kernel
(`generation/gemv.c`, built once into SURESERVE_HOME; left out where it cannot be built).

    .venv/bin/python scripts/step_linears.py [-o out.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sureserve.loading.machine import best_ms

#: smollm2's linear layers (q, k, v, o, gate, up, down) and their count
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
          (576, 1536)]
LAYERS = 30


def step_ms(fn: Callable[[], object], runs: int = 1) -> float:
    """ms per call of ``fn``: the best of ``runs`` timings of ten calls (after ten to warm
    up). Also used by the other decode-step scripts here."""
    return best_ms(lambda: [fn() for _ in range(10)], runs) / 10


def step_weights() -> list[list[torch.Tensor]]:
    """Every layer's weights, each its own tensor (so that a step streams them from memory
    as a real one does)."""
    torch.manual_seed(0)
    return [[torch.randn(n, k) for n, k in SHAPES] for _ in range(LAYERS)]


def torch_variants(ws: list[list[torch.Tensor]], xs: dict[int, torch.Tensor], m: int,
                   kernel: Any) -> list[tuple[str, Callable[[], None]]]:
    """One step's linears at ``m`` rows through ``F.linear``, oneDNN's packed linear and
    sureserve's decode kernel (when it could be built): name, step."""
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w, m) for w in layer] for layer in ws]

    def plain() -> None:
        for layer in ws:
            for w in layer:
                F.linear(xs[w.shape[1]], w)

    def pack() -> None:
        for layer, pl in zip(ws, packed, strict=True):
            for w, p in zip(layer, pl, strict=True):
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

    def own() -> None:
        for layer in ws:
            for w in layer:
                kernel(xs[w.shape[1]], w)

    out = [("F.linear", plain), ("onednn_packed", pack)]
    return [*out, ("sureserve_kernel", own)] if kernel is not None else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path)
    a = ap.parse_args()
    ws = step_weights()
    flops_per_row = 2 * sum(n * k for n, k in SHAPES) * LAYERS
    from sureserve.generation.native import build
    from sureserve.settings import Settings

    kernel, why = build(Settings().home_dir())
    rep: dict[str, object] = {"threads": torch.get_num_threads(), "rows": {},
                              "kernel": why or "built"}
    for m in (1, 8, 32):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        row = {}
        for name, fn in torch_variants(ws, xs, m, kernel):
            ms = step_ms(fn)
            row[name] = {"ms": round(ms, 2), "gflops": round(flops_per_row * m / ms / 1e6, 1)}
        rep["rows"][str(m)] = row  # type: ignore[index]
        print(m, "rows:", json.dumps(row))
    w, x = torch.randn(1536, 576), torch.randn(32, 576)
    p = torch.ops.mkldnn._reorder_linear_weight(w, 32)
    ms = best_ms(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                          for _ in range(2000)], 1) / 2000
    rep["one_weight_in_cache_32x576x1536_gflops"] = round(2 * 32 * 576 * 1536 / ms / 1e6, 1)
    print("one 1536x576 weight kept in cache, 32 rows:",
          rep["one_weight_in_cache_32x576x1536_gflops"], "GFLOP/s")
    if a.out:
        a.out.write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
