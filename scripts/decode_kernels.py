"""Where a CPU decode step's matmuls go, per weight layout and kernel (BENCHMARKS.md
"Generation: decode kernels"). For each of smollm2's weight shapes, at 1 and 32 rows:
``F.linear`` on the row-major weight (what transformers runs), on a column-major copy
(generation/layout.py), and torch's packed int8 / int4 weight-only kernels
(quantize/kernels.py) fed fp32 and bf16 activations. Each figure is the best of several
passes over enough copies of the matrix (96 MiB) that it streams from memory, as in a real
step. Then greedy decode tok/s of smollm2 with and without the measured layout.

    .venv/bin/python scripts/decode_kernels.py [-o decode_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F

SHAPES = [(49152, 576), (1536, 576), (576, 1536), (576, 576), (192, 576)]


def best_ms(fn: Any, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def kernels() -> list[dict[str, Any]]:
    from sureserve.quantize.kernels import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    rows = []
    for o, i in SHAPES:
        copies = max(1, (96 << 20) // (o * i * 4))
        lin = [torch.nn.Linear(i, o, bias=False).requires_grad_(False) for _ in range(copies)]
        col = [w.weight.t().contiguous().t() for w in lin]
        q8 = [Int8WeightOnlyLinear(w) for w in lin]
        q4 = [Int4WeightOnlyLinear(w) for w in lin]
        for m in (1, 32):
            r = {"shape": f"{o}x{i}", "rows": m, **_timings(torch.randn(m, i), lin, col, q8, q4)}
            rows.append({k: round(v / copies, 4) if isinstance(v, float) else v
                         for k, v in r.items()})
            print(rows[-1], flush=True)
    return rows


def _timings(x: Any, lin: list[Any], col: list[Any], q8: list[Any],
             q4: list[Any]) -> dict[str, float]:
    """ms for one pass over every copy, per contender."""
    xb = x.bfloat16()
    with torch.inference_mode():
        return {
            "fp32_row_major": best_ms(lambda: [w(x) for w in lin]),
            "fp32_col_major": best_ms(lambda: [F.linear(x, w) for w in col]),
            "int8_fp32_act": best_ms(lambda: [torch.ops.aten._weight_int8pack_mm(
                x, q.weight_int8, q.scale) for q in q8]),
            "int8_module": best_ms(lambda: [q(x) for q in q8]),
            "int4_module": best_ms(lambda: [q(x) for q in q4]),
            "int4_bf16_in": best_ms(lambda: [q(xb) for q in q4]),
        }


def decode() -> dict[str, Any]:
    import sureserve

    out: dict[str, Any] = {}
    prompts = ["Once upon a time", "The capital of France is", "def fib(n):", "Hi there",
               "1, 2, 3,", "Tell me a joke", "The best way to", "In 1999,"]
    for label, kw in (("row-major", {"decode_weight_layout": False}), ("measured", {})):
        eng = sureserve.load("smollm2", **kw).generation
        assert eng is not None
        one = [eng.encode(prompts[0])]
        eng.generate_ids(one, 4)
        rate, toks = 0.0, []
        for _ in range(3):
            start = time.perf_counter()
            toks = eng.generate_ids(one, 64)
            rate = max(rate, len(toks[0]) / (time.perf_counter() - start))
        eight = [eng.encode(p) for p in prompts]
        start = time.perf_counter()
        outs = eng.generate_ids(eight, 32)
        out[label] = {"tok_s_1": round(rate, 1),
                      "tok_s_8": round(sum(map(len, outs)) / (time.perf_counter() - start), 1),
                      "layout": eng.layout.to_dict(), "tokens": toks + outs}
        print(label, out[label]["tok_s_1"], out[label]["tok_s_8"], eng.layout.describe(),
              flush=True)
    out["identical"] = out["row-major"].pop("tokens") == out["measured"].pop("tokens")
    out["ratio_1"] = round(out["measured"]["tok_s_1"] / out["row-major"]["tok_s_1"], 2)
    out["ratio_8"] = round(out["measured"]["tok_s_8"] / out["row-major"]["tok_s_8"], 2)
    print("identical greedy tokens:", out["identical"], "ratios:", out["ratio_1"],
          out["ratio_8"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default="decode_kernels.json")
    args = ap.parse_args()
    rep = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "kernels": kernels(), "decode": decode()}
    with open(args.output, "w") as fh:
        json.dump(rep, fh, indent=1)
    print("wrote", args.output)


if __name__ == "__main__":
    main()
