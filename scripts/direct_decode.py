"""The direct decode step against the model's forward, through sureserve's engine, in one
process (BENCHMARKS.md "Generation: a direct decode step"). smollm2 (or another generation
model), greedy, the two paths alternated so that drift of the machine hits both:

- 1 row: one chat prompt, 64 new tokens, best of 3 per path;
- the direct step runs its layers in TorchScript ("direct") or in the Python loop
  ("python", ``decode_script`` off);
- "kernel": the Python loop through sureserve's GEMV kernel (``decode_kernel``), where
  this machine measured it faster (up to its row count; TorchScript above);
- 8 and 32 rows: that many prompts of the realistic mix submitted together (continuous
  batching over the padded cache), 32 new tokens each, best of 2.

Token ids of every run are compared between the paths (the direct step is bit-identical,
so they must be equal). Optionally a torch profile of 16 one-row tokens per path.

    .venv/bin/python scripts/direct_decode.py [-m MODEL] [-o out.json] [--profile]
        [--quantization int8-weight-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import sureserve
from sureserve.generation.direct import plan
from sureserve.zoo.corpora import realistic_mix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--quantization", help="e.g. int8-weight-only: the kernel then reads "
                    "int8 weights (its tokens are compared with the quantized model's own "
                    "forward, which rounds activations to bf16: they may differ)")
    args = ap.parse_args()
    extra = {"quantization": args.quantization} if args.quantization else {}
    gen = sureserve.load(args.model, **extra).generation
    paths = {"forward": plan(gen.model, enabled=False),
             "python": plan(gen.model, script=False), "direct": plan(gen.model)}
    # sureserve's GEMV kernel (decode_kernel) where this machine measured it faster
    print(f"GEMV kernel: {gen.kernel.describe()}", flush=True)
    if gen.kernel.max_rows:
        paths["kernel"] = plan(gen.model, kernel=gen.kernel)
        # the kernel's fused calls per layer in the Python loop (the whole step off)
        paths["kernel-loop"] = plan(gen.model, kernel=gen.kernel, whole=False)
    if paths["direct"].direct is None:
        raise SystemExit(f"{args.model}: {paths['direct'].describe()}")
    one = [gen.encode([{"role": "user", "content": "Write a short note about rivers and "
                                                   "why they matter to towns."}])]
    mix = [gen.encode(t[:400]) for t in realistic_mix(32, 0.0, seed=3)]
    workloads = {"1 row x 64": (one, 64, 3), "8 rows x 32": (mix[:8], 32, 2),
                 "32 rows x 32": (mix, 32, 2)}
    report: dict[str, Any] = {"model": args.model, "quantization": args.quantization,
                              "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "results": {}}
    for name, (prompts, new, repeats) in workloads.items():
        best = {p: 0.0 for p in paths}
        outs: dict[str, list[list[int]]] = {}
        gen.decode = paths["forward"]
        gen.generate_ids(prompts, 4)  # warm-up (allocations, thread pools)
        for _ in range(repeats):
            for p, chosen in paths.items():
                gen.decode = chosen
                t = time.perf_counter()
                outs[p] = gen.generate_ids(prompts, new)
                rate = sum(len(o) for o in outs[p]) / (time.perf_counter() - t)
                best[p] = max(best[p], rate)
        row = {"forward_tok_s": round(best["forward"], 2),
               "direct_python_tok_s": round(best["python"], 2),
               "direct_tok_s": round(best["direct"], 2),
               "direct_over_forward": round(best["direct"] / best["forward"], 3),
               "direct_over_python": round(best["direct"] / best["python"], 3),
               "identical": outs["direct"] == outs["forward"] == outs["python"]}
        if "kernel" in best:
            row["kernel_tok_s"] = round(best["kernel"], 2)
            row["kernel_over_direct"] = round(best["kernel"] / best["direct"], 3)
            row["kernel_identical"] = outs["kernel"] == outs["forward"]
            row["kernel_loop_tok_s"] = round(best["kernel-loop"], 2)
            row["kernel_over_loop"] = round(best["kernel"] / best["kernel-loop"], 3)
            row["kernel_loop_identical"] = outs["kernel-loop"] == outs["forward"]
        report["results"][name] = row
        print(f"{name}: forward {row['forward_tok_s']} tok/s, direct (Python loop) "
              f"{row['direct_python_tok_s']}, direct (TorchScript) {row['direct_tok_s']} tok/s "
              f"({row['direct_over_forward']}x forward, {row['direct_over_python']}x Python "
              f"loop), identical tokens: {row['identical']}", flush=True)
        if "kernel" in best:
            print(f"    GEMV kernel, whole step in one call: {row['kernel_tok_s']} tok/s "
                  f"({row['kernel_over_direct']}x TorchScript, {row['kernel_over_loop']}x the "
                  f"kernel's calls per layer: {row['kernel_loop_tok_s']}), tokens identical "
                  f"to the forward's: {row['kernel_identical']} "
                  f"(per layer: {row['kernel_loop_identical']})", flush=True)
    if args.profile:
        from torch.profiler import profile

        for p, chosen in paths.items():
            gen.decode = chosen
            with profile() as prof:
                gen.generate_ids(one, 16)
            print(f"--- {p}, 16 tokens, one row")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
