"""Diagnostic for BENCHMARKS.md "Memory under load": minilm forward passes over random
input shapes, printing RSS every 100 passes. Compare oneDNN primitive cache capacities:

    ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 .venv/bin/python scripts/onednn_shapes.py 600

(sureserve.load sets the variable only when it is not already set.)
"""

from __future__ import annotations

import random
import sys
import time

import psutil
import torch

import sureserve


def main(passes: int, max_rows: int = 16, max_len: int = 128) -> None:
    torch.set_num_threads(1)
    model = sureserve.load("minilm").model
    proc, rng, seen = psutil.Process(), random.Random(0), set()
    start = time.time()
    print("start rss", proc.memory_info().rss >> 20, "MiB")
    for i in range(passes):
        rows, length = rng.randint(1, max_rows), rng.randint(4, max_len)
        seen.add((rows, length))
        ids = torch.randint(1000, 2000, (rows, length))
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        if i % 100 == 99:
            print(i + 1, "passes", len(seen), "shapes, rss", proc.memory_info().rss >> 20,
                  f"MiB, {time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 600)
