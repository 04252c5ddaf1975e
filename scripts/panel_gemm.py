"""A panel-packed float32 GEMM for decode steps, measured against oneDNN's packed linear
and sureserve's decode kernel (BENCHMARKS.md "Generation: where a shared prefix's time
goes", issue #24). Builds ``scripts/panel_gemm.c`` with ``cc -O3 -march=native -fopenmp``
into a temporary folder; smollm2's seven weight shapes x 30 layers (random, each its own
tensor so that the weights stream from memory as in a step), 1, 8 and 32 rows, best of
three runs of ten steps; the largest difference to ``F.linear`` per row count.

    .venv/bin/python scripts/panel_gemm.py [-o out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
          (576, 1536)]
LAYERS = 30


def best_ms(fn: Callable[[], object]) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(10):
            fn()
        best = min(best, (time.perf_counter() - start) / 10)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path)
    a = ap.parse_args()
    src = Path(__file__).with_name("panel_gemm.c")
    tmp = Path(tempfile.mkdtemp(prefix="panel-"))
    so = tmp / "libpanel.so"
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", "-fopenmp",
                    "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    P, N = ctypes.c_void_p, ctypes.c_int
    lib.pack.argtypes = [P, P, N, N]
    lib.gemm.argtypes = [P, P, P, N, N, N, N]

    from sureserve.generation.native import build
    from sureserve.settings import Settings

    kernel, _ = build(Settings().home_dir())
    torch.manual_seed(0)
    ws = [[torch.randn(n, k) for n, k in SHAPES] for _ in range(LAYERS)]
    panels = []
    for layer in ws:
        row = []
        for w in layer:
            p = torch.empty_like(w)
            lib.pack(w.data_ptr(), p.data_ptr(), w.shape[0], w.shape[1])
            row.append(p)
        panels.append(row)
    flops = 2 * sum(n * k for n, k in SHAPES) * LAYERS
    rep: dict[str, object] = {"threads": torch.get_num_threads(), "rows": {}}
    for m in (1, 8, 32):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        ys = {n: torch.empty(m, n) for n in (576, 192, 1536)}
        onednn = [[torch.ops.mkldnn._reorder_linear_weight(w, m) for w in layer]
                  for layer in ws]
        diff = 0.0
        for w, p in zip(ws[0], panels[0], strict=True):
            y = torch.empty(m, w.shape[0])
            lib.gemm(xs[w.shape[1]].data_ptr(), p.data_ptr(), y.data_ptr(), m, w.shape[0],
                     w.shape[1], 0)
            diff = max(diff, float((y - F.linear(xs[w.shape[1]], w)).abs().max()))

        def panel(pf: int, xs: dict[int, torch.Tensor] = xs,
                  ys: dict[int, torch.Tensor] = ys, m: int = m) -> Callable[[], None]:
            def run() -> None:
                for layer, pl in zip(ws, panels, strict=True):
                    for w, p in zip(layer, pl, strict=True):
                        lib.gemm(xs[w.shape[1]].data_ptr(), p.data_ptr(),
                                 ys[w.shape[0]].data_ptr(), m, w.shape[0], w.shape[1], pf)
            return run

        def packed(xs: dict[int, torch.Tensor] = xs,
                   onednn: list[list[torch.Tensor]] = onednn) -> None:
            for layer, pl in zip(ws, onednn, strict=True):
                for w, p in zip(layer, pl, strict=True):
                    torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

        def own(xs: dict[int, torch.Tensor] = xs) -> None:
            assert kernel is not None
            for layer in ws:
                for w in layer:
                    kernel(xs[w.shape[1]], w)

        variants: list[tuple[str, Callable[[], object]]] = [
            ("panel", panel(0)), ("panel_prefetch", panel(1)), ("onednn_packed", packed)]
        if kernel is not None:
            variants.append(("sureserve_kernel", own))
        row = {name: round(best_ms(fn), 2) for name, fn in variants}
        row_rep = {"ms": row, "panel_gflops": round(flops * m / row["panel"] / 1e6, 1),
                   "panel_max_abs_diff_vs_F.linear": diff}
        rep["rows"][str(m)] = row_rep  # type: ignore[index]
        print(m, "rows:", json.dumps(row_rep))
    if a.out:
        a.out.write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
