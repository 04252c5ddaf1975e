"""Where a CPU decode step's matmuls go, per weight layout and kernel (BENCHMARKS.md
"Generation: decode kernels"). For each of smollm2's weight shapes, at 1 and 32 rows:
``F.linear`` on the row-major weight (what transformers runs), on a column-major copy
(generation/layout.py), and torch's packed int8 / int4 weight-only kernels
(loading/kernels.py) fed fp32 and bf16 activations. Each figure is the best of several
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

from sureserve.loading.machine import best_ms

SHAPES = [(49152, 576), (1536, 576), (576, 1536), (576, 576), (192, 576)]


def kernels() -> list[dict[str, Any]]:
    from sureserve.loading.kernels import Int4WeightOnlyLinear, Int8WeightOnlyLinear

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


PROMPTS = ["Once upon a time", "The capital of France is", "def fib(n):", "Hi there",
           "1, 2, 3,", "Tell me a joke", "The best way to", "In 1999,"]


def _engines() -> Any:
    """(label, generation engine): fp32 row-major, fp32 as laid out here, and the
    weight-only recipes ``sureserve quantize`` offers (heads in fp32, as it applies them)."""
    import sureserve
    from sureserve.api import _load_and_gate
    from sureserve.loading.precision import Recipe
    from sureserve.settings import Settings

    yield "fp32 row-major", sureserve.load("smollm2", decode_weight_layout=False).generation
    yield "fp32 measured layout", sureserve.load("smollm2").generation
    for method in ("int8-weight-only", "int4-weight-only"):
        engine, _ = _load_and_gate("smollm2", None, None, None, Settings(),
                                   Recipe(method, (), True))
        yield method, engine.generation


def decode() -> dict[str, Any]:
    out: dict[str, Any] = {}
    prompts = PROMPTS
    for label, eng in _engines():
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
        ref = out.get("fp32 row-major")
        out[label] = {"tok_s_1": round(rate, 1),
                      "tok_s_8": round(sum(map(len, outs)) / (time.perf_counter() - start), 1),
                      "layout": eng.layout.to_dict(), "tokens": toks + outs}
        if ref is not None:
            row = out[label]
            row["x_row_major_1"] = round(row["tok_s_1"] / ref["tok_s_1"], 2)
            row["x_row_major_8"] = round(row["tok_s_8"] / ref["tok_s_8"], 2)
            row["greedy_identical"] = sum(a == b for a, b in zip(ref["tokens"], row["tokens"],
                                                                 strict=True))
        print(label, {k: v for k, v in out[label].items() if k not in ("tokens", "layout")},
              eng.layout.describe(), flush=True)
        del eng
    for row in out.values():
        row.pop("tokens")
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
