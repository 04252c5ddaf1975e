"""Where a batched decode step goes, and what the CPU's GEMM kernels offer for it
(BENCHMARKS.md "Generation: batched decode, kernels measured"; issue #24's 32-client row).

Part 1: a torch profile of smollm2's greedy decode through sureserve's engine at 1 and 32
rows (short chat prompts, 64 new tokens), the top operators by self CPU time.

Part 2: each of smollm2's weight shapes times 1, 8, 17 and 32 rows, 30 distinct copies per
shape (one per layer, so the weights stream from memory as in a step, not from cache):
torch's `F.linear` on the row-major weight (what runs), the same weight stored
column-major, MKL's packed GEMM (`mkl._mkl_reorder_linear_weight`, packed for 32 rows),
oneDNN's packed linear (`mkldnn._reorder_linear_weight`), and q/k/v and gate/up fused into
one matrix each. Bit-equality with `F.linear` is reported per variant: the fp32 path
promises tokens equal to `transformers` generate.

    .venv/bin/python scripts/batched_gemm.py [-o out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sureserve.loading.machine import best_ms

SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576),
          "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536),
          "lm_head 49152x576": (49152, 576)}
ROWS = (1, 8, 17, 32)
LAYERS = 30


def profile_steps() -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    import sureserve

    gen = sureserve.load("smollm2").generation
    prompts = [gen.encode([{"role": "user", "content": f"Tell me something about topic "
                                                       f"number {i}."}]) for i in range(32)]
    gen.generate_ids(prompts[:4], 4)
    out: dict[str, Any] = {"decode_path": gen.decode_path()}
    for rows in (1, 32):
        t = time.perf_counter()
        done = gen.generate_ids(prompts[:rows], 64)
        seconds = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gen.generate_ids(prompts[:rows], 64)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        out[f"{rows} rows"] = {
            "tok_s": round(sum(len(d) for d in done) / seconds, 1),
            "ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3),
                     "calls": e.count, "us_per_call": round(e.self_cpu_time_total / e.count, 1)}
                    for e in top]}
    return out


def _plain(x: torch.Tensor, ws: list[torch.Tensor], i: int) -> torch.Tensor:
    return F.linear(x, ws[i])


def _mkl(x: torch.Tensor, packed: list[torch.Tensor], ws: list[torch.Tensor], i: int
         ) -> torch.Tensor:
    return torch.ops.mkl._mkl_linear(x, packed[i], ws[i], None, 32)


def _dnnl(x: torch.Tensor, packed: list[torch.Tensor], i: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")


def _all(fn: Callable[[int], torch.Tensor], layers: int) -> None:
    for i in range(layers):
        fn(i)


def _each(x: torch.Tensor, groups: list[tuple[torch.Tensor, ...]]) -> None:
    for group in groups:
        for w in group:
            F.linear(x, w)


def kernels() -> list[dict[str, Any]]:
    rows_out = []
    for name, (n, k) in SHAPES.items():
        layers = 1 if n == 49152 else LAYERS
        ws = [torch.randn(n, k) for _ in range(layers)]
        col = [w.t().contiguous().t() for w in ws]
        mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, 32) for w in ws]
        dnnl = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
        for m in ROWS:
            x = torch.randn(m, k)
            variants: dict[str, Callable[[int], torch.Tensor]] = {
                "row-major F.linear": functools.partial(_plain, x, ws),
                "column-major": functools.partial(_plain, x, col),
                "MKL packed (for 32 rows)": functools.partial(_mkl, x, mkl, ws),
                "oneDNN packed": functools.partial(_dnnl, x, dnnl),
            }
            ref = [F.linear(x, w) for w in ws[:2]]
            row: dict[str, Any] = {"shape": name, "rows": m}
            for label, fn in variants.items():
                run = functools.partial(_all, fn, layers)
                row[label] = {"us": round(best_ms(run, 5) / layers * 1e3, 1),
                              "bit_equal": all(torch.equal(fn(i), ref[i])
                                               for i in range(len(ref)))}
            rows_out.append(row)
    return rows_out


def fused() -> list[dict[str, Any]]:
    out = []
    for m in ROWS:
        x = torch.randn(m, 576)
        q = [torch.randn(576, 576) for _ in range(LAYERS)]
        kv = [(torch.randn(192, 576), torch.randn(192, 576)) for _ in range(LAYERS)]
        gu = [(torch.randn(1536, 576), torch.randn(1536, 576)) for _ in range(LAYERS)]
        qkv = [torch.cat([a, b, c]) for a, (b, c) in zip(q, kv, strict=True)]
        gate_up = [torch.cat(p) for p in gu]
        sep_qkv = best_ms(functools.partial(_each, x, [(a, b, c) for a, (b, c) in
                                                     zip(q, kv, strict=True)]), 5)
        one_qkv = best_ms(functools.partial(_each, x, [(w,) for w in qkv]), 5)
        sep_gu = best_ms(functools.partial(_each, x, gu), 5)
        one_gu = best_ms(functools.partial(_each, x, [(w,) for w in gate_up]), 5)
        out.append({"rows": m, "qkv_separate_us": round(sep_qkv / LAYERS * 1e3, 1),
                    "qkv_fused_us": round(one_qkv / LAYERS * 1e3, 1),
                    "gate_up_separate_us": round(sep_gu / LAYERS * 1e3, 1),
                    "gate_up_fused_us": round(one_gu / LAYERS * 1e3, 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    rep = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "profile": profile_steps(), "kernels": kernels(), "fused": fused()}
    for rows in ("1 rows", "32 rows"):
        p = rep["profile"][rows]
        print(f"{rows}: {p['tok_s']} tok/s; " + ", ".join(
            f"{o['op']} {o['share']:.0%} ({o['us_per_call']} us x {o['calls']})"
            for o in p["ops"][:5]))
    for row in rep["kernels"]:
        print(f"{row['shape']:18} x{row['rows']:<3}", "  ".join(
            f"{k}: {v['us']} us{'' if v['bit_equal'] else ' (not bit-equal)'}"
            for k, v in row.items() if isinstance(v, dict)))
    for row in rep["fused"]:
        print(row)
    if args.output:
        args.output.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
