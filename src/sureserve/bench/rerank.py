"""``sureserve bench rerank``: sureserve's reranker against sentence-transformers'
``CrossEncoder.predict(batch_size=32)`` on the same (query, passage) pairs, in one run.

Pairs: headlines of the BBC sport and tech folders (never trained on by ``rerank-demo``)
as queries, each against ``candidates`` article bodies (its own and others, cut to
100-1,500 characters, seeded: passages of mixed sizes, as a retriever returns them).
Both sides cut a pair to the model's maximum by cutting the body (sureserve's truncate
policy never cuts the query; sentence-transformers' longest-first cuts the longer side,
the body), so both see the same tokens and the scores must agree within 1e-5. sureserve
ranks each query's candidates through ``Engine.rerank`` (its planner batches them);
sentence-transformers predicts all pairs in batches of 32. Each side runs twice and keeps
its faster run; the order alternates.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.bench.harness import write_report

BODY_CHARS = 1500


def pairs(queries: int, candidates: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    from sureserve.zoo.rerank import UNSEEN_TOPICS, articles

    rows = [a for t in UNSEEN_TOPICS for a in articles(t)]
    rng = random.Random(seed)
    picked = rng.sample(range(len(rows)), queries)
    out = []
    for i in picked:
        others = rng.sample([j for j in range(len(rows)) if j != i], candidates - 1)
        # passages of mixed sizes, as a retriever's chunks are: 100 to 1,500 characters
        bodies = [rows[j][1][:rng.randint(100, BODY_CHARS)] for j in [i, *others]]
        rng.shuffle(bodies)
        out.append((rows[i][0], bodies))
    return out


def run_rerank_bench(queries: int = 16, candidates: int = 40, model: str = "rerank-demo",
                     out: Path | None = None, log: Callable[[str], None] = print
                     ) -> dict[str, Any]:
    import torch
    from sentence_transformers import CrossEncoder

    import sureserve

    work = pairs(queries, candidates)
    n_pairs = queries * candidates
    engine = sureserve.load(model, task="rerank")
    path = str(engine.loaded.source.path)
    st = CrossEncoder(path, device="cpu")
    flat = [(q, d) for q, docs in work for d in docs]

    def ours() -> np.ndarray:
        scores = []
        for q, docs in work:
            ranked = engine.rerank(q, docs, truncation="truncate")
            by_index = {r["index"]: r["score"] for r in ranked}
            scores += [by_index[k] for k in range(len(docs))]
        return np.asarray(scores)

    def theirs() -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(st.predict(flat, batch_size=32, show_progress_bar=False))

    ours(), theirs()  # warm-up
    times: dict[str, list[float]] = {"sureserve": [], "sentence-transformers": []}
    results: dict[str, np.ndarray] = {}
    for rnd in range(2):
        for name, fn in ((("sureserve", ours), ("sentence-transformers", theirs)) if rnd == 0
                         else (("sentence-transformers", theirs), ("sureserve", ours))):
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            log(f"{name}: {n_pairs / times[name][-1]:.1f} pairs/s")
    diff = float(np.abs(results["sureserve"] - results["sentence-transformers"]).max())
    best = {k: min(v) for k, v in times.items()}
    report = {
        "model": model, "queries": queries, "candidates": candidates, "pairs": n_pairs,
        "torch_threads": torch.get_num_threads(),
        "pairs_per_s": {k: round(n_pairs / v, 1) for k, v in best.items()},
        "speedup_vs_sentence_transformers": round(best["sentence-transformers"]
                                                  / best["sureserve"], 3),
        "max_abs_score_diff": diff,
        "build_report": json.loads((Path(path) / "build_report.json").read_text())
        if (Path(path) / "build_report.json").is_file() else None,
    }
    return write_report(out, report)


def print_report(rep: dict[str, Any], log: Callable[[str], None] = print) -> None:
    p = rep["pairs_per_s"]
    log(f"rerank ({rep['pairs']} pairs, {rep['queries']} queries x {rep['candidates']}): "
        f"sureserve {p['sureserve']} pairs/s, sentence-transformers CrossEncoder "
        f"{p['sentence-transformers']} pairs/s -> {rep['speedup_vs_sentence_transformers']}x; "
        f"largest score difference {rep['max_abs_score_diff']:.2e}")
