"""A/B of decode-kernel sources in one process (BENCHMARKS.md "Generation: float32 weights
read one row after another"): the checked-in ``generation/gemv.c`` against variants given
as paths, each built as sureserve builds it and run on smollm2's one-call decode step, the
variants alternated round by round so that the machine's drift hits all alike.

Per variant: end-to-end tok/s of ``generate_ids`` (one prompt x 72 new tokens, and
``--rows`` prompts x 40), the time of one decode step (the 8-token run subtracted from the
long one, best of ``--rounds``), and whether the greedy tokens equal the model's forward.

    .venv/bin/python scripts/kernel_ab.py [VARIANT.c ...] [--rows 8] [--rounds 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import sureserve
from sureserve.generation import native
from sureserve.generation.direct import plan
from sureserve.zoo.corpora import realistic_mix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", type=Path)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    gen = sureserve.load("smollm2", drift_watch=False).generation
    assert gen is not None
    plans: dict[str, Any] = {}
    for name, src in [("checked-in gemv.c", native.SOURCE),
                      *((str(v), v) for v in args.variants)]:
        native.SOURCE = src  # build() keys its cache by the source's bytes
        kernel, why = native.build(None)
        if kernel is None:
            raise SystemExit(f"{src}: {why}")
        plans[name] = plan(gen.model, kernel=dataclasses.replace(gen.kernel, kernel=kernel))
    one = [gen.encode([{"role": "user", "content": "Write a short note about rivers and "
                                                   "why they matter to towns."}])]
    many = [gen.encode(t[:400]) for t in realistic_mix(args.rows, 0.0, seed=3)]
    gen.decode = plan(gen.model, enabled=False)
    ref = {"1": gen.generate_ids(one, 72), "n": gen.generate_ids(many, 40)}
    work = {"1": (one, 72, 64), "n": (many, 40, 32)}
    best = {n: {k: [1e9, 1e9] for k in work} for n in plans}
    same: dict[tuple[str, str], bool] = {}
    for _ in range(args.rounds):
        for name, chosen in plans.items():
            gen.decode = chosen
            for key, (prompts, new, _steps) in work.items():
                for j, count in enumerate((8, new)):
                    t = time.perf_counter()
                    out = gen.generate_ids(prompts, count)
                    best[name][key][j] = min(best[name][key][j], time.perf_counter() - t)
                same[(name, key)] = out == ref[key]
    for name in plans:
        row = []
        for key, (prompts, new, steps) in work.items():
            short, long = best[name][key]
            step = (long - short) / steps * 1000
            row.append(f"{len(prompts)} row(s): {len(prompts) * new / long:.1f} tok/s, "
                       f"step {step:.2f} ms, tokens = forward's: {same[(name, key)]}")
        print(f"{name}: " + "; ".join(row), flush=True)


if __name__ == "__main__":
    main()
