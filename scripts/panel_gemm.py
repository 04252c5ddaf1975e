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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# this folder (where the script runs from): the step's shapes, weights, timing and the
# contenders step_linears.py measures
from step_linears import LAYERS, SHAPES, step_ms, step_weights, torch_variants


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
    ws = step_weights()
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

        variants = [("panel", panel(0)), ("panel_prefetch", panel(1)),
                    *((name, fn) for name, fn in torch_variants(ws, xs, m, kernel)
                      if name != "F.linear")]
        row = {name: round(step_ms(fn, 3), 2) for name, fn in variants}
        row_rep = {"ms": row, "panel_gflops": round(flops * m / row["panel"] / 1e6, 1),
                   "panel_max_abs_diff_vs_F.linear": diff}
        rep["rows"][str(m)] = row_rep  # type: ignore[index]
        print(m, "rows:", json.dumps(row_rep))
    if a.out:
        a.out.write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
