"""``sureserve bench rerank``: sureserve's reranker against sentence-transformers'
``CrossEncoder.predict(batch_size=32)`` on the same (query, passage) pairs, in one run.

Pairs: headlines of the BBC sport and tech folders (never trained on by ``rerank-demo``)
as queries, each against ``candidates`` article bodies (its own and others, cut to
100-1,500 characters, seeded: passages of mixed sizes, as a retriever returns them).
Both sides cut a pair to the model's maximum by cutting the body (sureserve's truncate
policy never cuts the query; sentence-transformers' longest-first cuts the longer side,
the body), so both see the same tokens and the scores must agree within 1e-5. sureserve
ranks each query's candidates through ``Engine.rerank`` (its planner batches them), and all
queries at once through ``Engine.rerank_many`` (every pair in one planner window);
sentence-transformers predicts all pairs in batches of 32. Each contender runs twice and
keeps its faster run; the order alternates.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.bench.harness import alternating, write_report

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


def run_rerank_bench(queries: int = 32, candidates: int = 20, model: str = "rerank-demo",
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

    def ours_many() -> np.ndarray:
        scores = []
        for (_, docs), ranked in zip(work, engine.rerank_many(work, truncation="truncate"),
                                     strict=True):
            by_index = {r["index"]: r["score"] for r in ranked}
            scores += [by_index[k] for k in range(len(docs))]
        return np.asarray(scores)

    def theirs() -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(st.predict(flat, batch_size=32, show_progress_bar=False))

    results, best = alternating([("sureserve", ours), ("sureserve rerank_many", ours_many),
                                 ("sentence-transformers", theirs)], n_pairs, "pairs", log)
    diff = max(float(np.abs(results[k] - results["sentence-transformers"]).max())
               for k in ("sureserve", "sureserve rerank_many"))
    report = {
        "model": model, "queries": queries, "candidates": candidates, "pairs": n_pairs,
        "torch_threads": torch.get_num_threads(),
        "pairs_per_s": {k: round(n_pairs / v, 1) for k, v in best.items()},
        "speedup_vs_sentence_transformers": round(best["sentence-transformers"]
                                                  / best["sureserve"], 3),
        "rerank_many_speedup_vs_sentence_transformers": round(
            best["sentence-transformers"] / best["sureserve rerank_many"], 3),
        "max_abs_score_diff": diff,
        "build_report": json.loads((Path(path) / "build_report.json").read_text())
        if (Path(path) / "build_report.json").is_file() else None,
    }
    return write_report(out, report)


def print_report(rep: dict[str, Any], log: Callable[[str], None] = print) -> None:
    p = rep["pairs_per_s"]
    log(f"rerank ({rep['pairs']} pairs, {rep['queries']} queries x {rep['candidates']}): "
        f"sureserve per query {p['sureserve']} pairs/s "
        f"({rep['speedup_vs_sentence_transformers']}x), rerank_many "
        f"{p['sureserve rerank_many']} pairs/s "
        f"({rep['rerank_many_speedup_vs_sentence_transformers']}x), sentence-transformers "
        f"CrossEncoder {p['sentence-transformers']} pairs/s; largest score difference "
        f"{rep['max_abs_score_diff']:.2e}")
