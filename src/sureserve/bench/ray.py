"""``sureserve bench ray``: the same offline job run locally and on Ray Data, side by side.

Both run as the user runs them (``sureserve embed -i FILE -o OUT`` with and without
``--ray``), in their own processes, on the realistic mix; wall time includes everything a
user waits for (Ray's start, every actor's model load and gate). The outputs are compared
row by row (index order and the largest cosine distance).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.bench.harness import write_report


def _job(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sureserve.cli", *args], capture_output=True,
                       text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr[-2000:]}")
    return time.perf_counter() - start, r.stderr


def _vectors(path: Path) -> tuple[list[int], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["index"] for r in rows], np.asarray([r["embedding"] for r in rows])


def run_bench(n: int, replicas: int, out: Path | None, log: Callable[[str], None]
              ) -> dict[str, Any]:
    import ray

    from sureserve.zoo.corpora import realistic_mix

    texts = realistic_mix(n, 0.05, seed=21)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "mix.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        common = ["embed", "-i", str(src), "--truncation", "truncate"]
        results: dict[str, Any] = {}
        outputs = {}
        for name, extra in (("local", []), (f"ray-{replicas}",
                                             ["--ray", "--replicas", str(replicas)])):
            dest = Path(tmp) / f"{name}.jsonl"
            seconds, err = _job([*common, "-o", str(dest), *extra])
            outputs[name] = _vectors(dest)
            results[name] = {"seconds": round(seconds, 2), "texts_per_s": round(n / seconds, 1),
                             "summary": [line for line in err.splitlines()
                                         if line.startswith(("embed:", "  actor"))]}
            log(f"{name}: {n} texts in {seconds:.1f} s ({n / seconds:.1f} texts/s)")
    (ia, a), (ib, b) = outputs["local"], outputs[f"ray-{replicas}"]
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    local_s = results["local"]["seconds"]
    report = {"ray": ray.__version__, "texts": n, "replicas": replicas, "results": results,
              "ray_over_local_throughput": round(local_s / results[f"ray-{replicas}"]
                                                 ["seconds"], 3),
              "same_order": ia == ib == list(range(n)),
              "min_cosine_ray_vs_local": round(float(cos.min()), 7)}
    return write_report(out, report)


def print_report(rep: dict[str, Any], log: Callable[[str], None]) -> None:
    for name, r in rep["results"].items():
        log(f"{name}: {r['seconds']} s, {r['texts_per_s']} texts/s")
    log(f"ray {rep['ray']} with {rep['replicas']} replicas / local throughput: "
        f"{rep['ray_over_local_throughput']}x; same order: {rep['same_order']}; min cosine "
        f"{rep['min_cosine_ray_vs_local']}")
