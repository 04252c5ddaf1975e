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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
          (576, 1536)]
LAYERS = 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    ws = [[torch.randn(n, k) for n, k in SHAPES] for _ in range(LAYERS)]
    flops_per_row = 2 * sum(n * k for n, k in SHAPES) * LAYERS
    from sureserve.generation.native import build
    from sureserve.settings import Settings

    kernel, why = build(Settings().home_dir())
    rep: dict[str, object] = {"threads": torch.get_num_threads(), "rows": {},
                              "kernel": why or "built"}
    for m in (1, 8, 32):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        packed = [[torch.ops.mkldnn._reorder_linear_weight(w, m) for w in layer] for layer in ws]

        def plain(xs: dict[int, torch.Tensor] = xs) -> None:
            for layer in ws:
                for w in layer:
                    F.linear(xs[w.shape[1]], w)

        def pack(xs: dict[int, torch.Tensor] = xs,
                 packed: list[list[torch.Tensor]] = packed) -> None:
            for layer, pl in zip(ws, packed, strict=True):
                for w, p in zip(layer, pl, strict=True):
                    torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

        def own(xs: dict[int, torch.Tensor] = xs) -> None:
            assert kernel is not None
            for layer in ws:
                for w in layer:
                    kernel(xs[w.shape[1]], w)

        row = {}
        variants = [("F.linear", plain), ("onednn_packed", pack)]
        if kernel is not None:
            variants.append(("sureserve_kernel", own))
        for name, fn in variants:
            fn()
            start = time.perf_counter()
            for _ in range(10):
                fn()
            ms = (time.perf_counter() - start) / 10 * 1e3
            row[name] = {"ms": round(ms, 2), "gflops": round(flops_per_row * m / ms / 1e6, 1)}
        rep["rows"][str(m)] = row  # type: ignore[index]
        print(m, "rows:", json.dumps(row))
    w, x = torch.randn(1536, 576), torch.randn(32, 576)
    p = torch.ops.mkldnn._reorder_linear_weight(w, 32)
    for _ in range(10):
        torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
    start = time.perf_counter()
    for _ in range(2000):
        torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
    s = (time.perf_counter() - start) / 2000
    rep["one_weight_in_cache_32x576x1536_gflops"] = round(2 * 32 * 576 * 1536 / s / 1e9, 1)
    print("one 1536x576 weight kept in cache, 32 rows:",
          rep["one_weight_in_cache_32x576x1536_gflops"], "GFLOP/s")
    if a.out:
        a.out.write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
