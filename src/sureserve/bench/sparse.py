"""``sureserve bench sparse``: sureserve's sparse (SPLADE) task against sentence-transformers'
``SparseEncoder.encode(batch_size=32)`` on the same model and texts, in one run.

Texts: the realistic mix (short VADER snippets, a few long BBC articles), cut to the
model's maximum on both sides (sureserve's truncate policy; sentence-transformers cuts at
its max_seq_length, the same limit here), so both see the same tokens and the weights must
agree within 1e-4. Each side runs twice and keeps its faster run; the order alternates.
Fidelity: the largest weight difference, and the share of each text's top-10 terms that
both sides agree on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.bench.harness import alternating, write_report


def run_sparse_bench(texts: int = 1000, model: str = "splade-tiny", out: Path | None = None,
                     log: Callable[[str], None] = print, long_share: float = 0.05
                     ) -> dict[str, Any]:
    import torch
    from sentence_transformers import SparseEncoder

    import sureserve
    from sureserve.zoo.corpora import realistic_mix

    work = realistic_mix(texts, long_share, seed=3)
    engine = sureserve.load(model, task="sparse", drift_watch=False)
    limit = engine.loaded.limit.value
    st = SparseEncoder(str(engine.loaded.source.path), device="cpu")
    st.max_seq_length = limit

    def ours() -> np.ndarray:
        return engine.run(work, truncation="truncate").rows

    def theirs() -> np.ndarray:
        with torch.inference_mode():
            enc = st.encode(work, batch_size=32, convert_to_tensor=True,
                            show_progress_bar=False)
        return enc.to_dense().numpy()

    results, best = alternating([("sureserve", ours), ("sentence-transformers", theirs)],
                                len(work), "texts", log)
    a, b = results["sureserve"], results["sentence-transformers"]
    top_a, top_b = np.argsort(-a, axis=1)[:, :10], np.argsort(-b, axis=1)[:, :10]
    agree = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top_a, top_b,
                                                                       strict=True)]))
    report = {
        "model": model, "texts": len(work), "limit_tokens": limit,
        "torch_threads": torch.get_num_threads(),
        "texts_per_s": {k: round(len(work) / v, 1) for k, v in best.items()},
        "speedup_vs_sentence_transformers": round(best["sentence-transformers"]
                                                  / best["sureserve"], 3),
        "max_abs_weight_diff": float(np.abs(a - b).max()),
        "top10_terms_agree": round(agree, 4),
        "active_terms_per_text": {"mean": round(float((a > 0).sum(axis=1).mean()), 1),
                                  "max": int((a > 0).sum(axis=1).max())},
    }
    return write_report(out, report)


def print_report(rep: dict[str, Any], log: Callable[[str], None] = print) -> None:
    t = rep["texts_per_s"]
    log(f"sparse ({rep['texts']} texts, {rep['model']}): sureserve {t['sureserve']} texts/s, "
        f"sentence-transformers SparseEncoder {t['sentence-transformers']} texts/s -> "
        f"{rep['speedup_vs_sentence_transformers']}x; largest weight difference "
        f"{rep['max_abs_weight_diff']:.2e}, top-10 terms agree {rep['top10_terms_agree']:.1%}")
