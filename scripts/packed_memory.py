"""Memory a packed linear keeps after calls with many input row counts (BENCHMARKS.md
"Memory with packed linears: found and bounded").

Threads call one packed (or plain) 1536x384 linear with random row counts, then park; the
RSS is read while they are parked (what the process keeps, not what a call holds). Run it
with the cache variables under test, e.g.::

    LRU_CACHE_CAPACITY=1024 python scripts/packed_memory.py --threads 6
    python scripts/packed_memory.py --threads 6 --bound 64   # sureserve's bound
    MALLOC_MMAP_THRESHOLD_=65536 python scripts/packed_memory.py --plain

Prints one line per round and writes JSON with ``-o``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import threading

import psutil
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=60, help="calls per thread per round")
    ap.add_argument("--max-rows", type=int, default=8192,
                    help="row counts drawn from 1..N (a negative N: always -N rows)")
    ap.add_argument("--plain", action="store_true", help="F.linear instead of packed")
    ap.add_argument("--same-rows", action="store_true",
                    help="every thread draws the same row counts")
    ap.add_argument("--bound", type=int, default=None,
                    help="apply sureserve's cache bound (onednn_cache_capacity) first")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()

    from sureserve.loading.machine import bound_onednn_cache
    from sureserve.loading.packed import pack, packed_linear

    if a.bound is not None:
        bound_onednn_cache(a.bound)
    torch.set_num_threads(1)
    w, b = torch.randn(1536, 384), torch.randn(1536)
    p = pack(w)
    proc = psutil.Process()
    go = [threading.Event() for _ in range(a.rounds + 1)]
    parked = threading.Barrier(a.threads + 1)

    def work(seed: int) -> None:
        torch.set_num_threads(1)
        r = random.Random(7 if a.same_rows else seed)
        with torch.inference_mode():
            for k in range(a.rounds):
                go[k].wait()
                for _ in range(a.calls):
                    m = r.randint(1, a.max_rows) if a.max_rows > 0 else -a.max_rows
                    x = torch.randn(m, 384)
                    y = torch.nn.functional.linear(x, w, b) if a.plain else \
                        packed_linear(x, p, b)
                del x, y
                parked.wait()
            go[a.rounds].wait()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(a.threads)]
    for t in threads:
        t.start()
    mb = [round(proc.memory_info().rss / 2**20)]
    print(f"start: {mb[0]} MB")
    for k in range(a.rounds):
        go[k].set()
        parked.wait()
        gc.collect()
        mb.append(round(proc.memory_info().rss / 2**20))
        print(f"parked after round {k}: {mb[-1]} MB", flush=True)
    go[a.rounds].set()
    for t in threads:
        t.join()
    env = {k: os.environ.get(k) for k in ("LRU_CACHE_CAPACITY",
                                          "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                          "MALLOC_MMAP_THRESHOLD_")}
    report = {"args": vars(a), "env": env, "rss_mb": mb, "grew_mb": mb[-1] - mb[1]}
    print(json.dumps(report))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
