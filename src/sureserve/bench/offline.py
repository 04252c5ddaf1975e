"""``sureserve bench embed|classify``: sureserve against the usual ways, in one run.

Contenders (same texts, same max length, fp32 unless named):
* ``pipeline``: ``transformers.pipeline(..., batch_size=32)``;
* ``sentence-transformers``: ``encode(batch_size=32)`` (embeddings only);
* ``arrival-32``: batches of 32 in arrival order, padded to the longest, plain model call;
* ``sureserve`` (and ``sureserve-bf16`` where the CPU has native bf16).
Each is compared with a reference: the fp32 model run on one text at a time (no padding).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.bench.harness import Result, cpu_has_bf16, timed
from sureserve.loading.machine import gemm_gflops, linear_flops_per_token

BATCH = 32


def _padded_cost(lengths: Sequence[int], order: Sequence[int], batch: int = BATCH) -> int:
    cost = 0
    for i in range(0, len(order), batch):
        part = [lengths[j] for j in order[i:i + batch]]
        cost += max(part) * len(part)
    return cost


def _mean_pool_normalize(hidden: Any, mask: Any) -> np.ndarray:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    v = ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float().numpy()
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _plain_runner(kind: str, model: Any, tok: Any, max_len: int) -> Callable[[list[str]],
                                                                             np.ndarray]:
    """A plain batch → outputs function (the same math sureserve does, without planning)."""
    import torch

    def run(batch: list[str]) -> np.ndarray:
        feats = tok(batch, padding=True, truncation=True, max_length=max_len,
                    return_tensors="pt")
        with torch.inference_mode():
            if kind == "embed":
                hidden = model(**feats).last_hidden_state
                return _mean_pool_normalize(hidden, feats["attention_mask"])
            return _softmax(model(**feats).logits.float().numpy())

    return run


def run_bench(kind: str, n: int = 2000, long_share: float = 0.05, seed: int = 0,
              skip: Sequence[str] = (), bf16: bool | None = None,
              out: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch
    import transformers

    import sureserve
    from sureserve.zoo.corpora import realistic_mix

    alias = "minilm" if kind == "embed" else "sentiment-demo"
    texts = realistic_mix(n, long_share, seed)
    engine = sureserve.load(alias, truncation="truncate")
    path = str(engine.loaded.source.path)
    max_len = engine.loaded.limit.value
    tok = engine.tokenizer
    lengths = [min(len(x), max_len) for x in tok(texts, truncation=False)["input_ids"]]
    real = sum(lengths)
    model = engine.model
    log(f"{kind}: {n} texts ({long_share:.0%} BBC articles), {real} real tokens, "
        f"max length {max_len}, torch threads {torch.get_num_threads()}")

    gemm = {"float32": gemm_gflops("float32")}
    bf16 = cpu_has_bf16() if bf16 is None else bf16
    if bf16:
        gemm["bfloat16"] = gemm_gflops("bfloat16")
    log("GEMM GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in gemm.items()))

    plain = _plain_runner(kind, model, tok, max_len)
    ref = timed("reference (fp32, batch 1)",
                lambda: (np.vstack([plain([t]) for t in texts]), real), n, real)
    log(f"reference done in {ref.seconds:.1f}s")
    results: list[Result] = []

    def contender(name: str, fn: Callable[[], tuple[Any, int]]) -> None:
        if name in skip:
            return
        r = timed(name, fn, n, real)
        results.append(r)
        log(f"{name}: {r.seconds:.1f}s")

    arrival = list(range(n))
    if kind == "embed":
        contender("pipeline", lambda: _pipeline_embed(path, texts, max_len, lengths))
        contender("sentence-transformers", lambda: _st_embed(path, texts, max_len, lengths))
    else:
        contender("pipeline", lambda: _pipeline_classify(path, engine, texts, max_len, lengths))
    contender("arrival-32", lambda: (np.vstack([plain(texts[i:i + BATCH])
                                                for i in range(0, n, BATCH)]),
                                     _padded_cost(lengths, arrival)))

    def ours(e: Any) -> tuple[Any, int]:
        res = e.run(texts)
        outs = res.outputs if kind == "embed" else e.task.probabilities(res.rows)
        return outs, res.summary.computed_tokens

    engine.embed(texts[:16]) if kind == "embed" else engine.classify(texts[:16])  # warm-up
    contender("sureserve", lambda: ours(engine))
    if bf16 and "sureserve-bf16" not in skip:
        e16 = sureserve.load(alias, truncation="truncate", dtype="bfloat16")
        e16.embed(texts[:16]) if kind == "embed" else e16.classify(texts[:16])
        contender("sureserve-bf16", lambda: ours(e16))

    report = _report(kind, results, ref, gemm, linear_flops_per_token(model), engine,
                     n, long_share, real, max_len, transformers.__version__, torch.__version__)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _pipeline_embed(path: str, texts: list[str], max_len: int,
                    lengths: list[int]) -> tuple[Any, int]:
    from transformers import pipeline

    pipe = pipeline("feature-extraction", model=path, device="cpu",
                    tokenize_kwargs={"truncation": True, "max_length": max_len})
    vecs = []
    for i, feats in enumerate(pipe(texts, batch_size=BATCH)):
        # Batched feature-extraction returns every text padded to its batch's longest: the
        # rows past the text's own length are padding states and must not be averaged in
        # (averaging them all gives cosines of ~0.1 to the true embedding on this mix).
        tokens = np.asarray(feats[0], dtype=np.float32)[: lengths[i]]
        v = tokens.mean(axis=0)
        vecs.append(v / np.linalg.norm(v))
    return np.vstack(vecs), _padded_cost(lengths, list(range(len(texts))))


def _st_embed(path: str, texts: list[str], max_len: int, lengths: list[int]) -> tuple[Any, int]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = max_len
    vecs = st.encode(texts, batch_size=BATCH, normalize_embeddings=True)
    # sentence-transformers sorts by length (longest first) before cutting batches of 32
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return vecs, _padded_cost(lengths, order)


def _pipeline_classify(path: str, engine: Any, texts: list[str], max_len: int,
                       lengths: list[int]) -> tuple[Any, int]:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=path, device="cpu", top_k=None,
                    truncation=True, max_length=max_len)
    labels = engine.task.labels
    rows = []
    scores: Any
    for scores in pipe(texts, batch_size=BATCH):
        by = {d["label"]: d["score"] for d in scores}
        rows.append([by[lbl] for lbl in labels])
    return np.asarray(rows), _padded_cost(lengths, list(range(len(texts))))


def _report(kind: str, results: list[Result], ref: Result, gemm: dict[str, float],
            flops_tok: int, engine: Any, n: int, long_share: float, real: int, max_len: int,
            tf_version: str, torch_version: str) -> dict[str, Any]:
    base = next((r for r in results if r.name == "sureserve"), results[-1])
    rows = []
    for r in results:
        if kind == "embed":
            fidelity = float((r.outputs * ref.outputs).sum(1).min())
        else:
            fidelity = float(np.abs(np.asarray(r.outputs) - ref.outputs).max())
        dtype = "bfloat16" if r.name.endswith("bf16") else "float32"
        achieved = flops_tok * r.real_tokens / r.seconds / 1e9
        rows.append({
            "name": r.name, "seconds": round(r.seconds, 2),
            "texts_per_s": round(r.texts_per_s, 1), "tokens_per_s": round(r.tokens_per_s),
            "padding_ratio": round(r.padding_ratio, 4), "padding_share": round(r.padding_share, 4),
            "peak_rss_mb": round(r.peak_rss_mb),
            "rss_growth_mb": r.extra.get("rss_growth_mb"), "speed_vs_sureserve":
                round(r.texts_per_s / base.texts_per_s, 3),
            "min_cosine_to_ref" if kind == "embed" else "max_prob_diff_to_ref": fidelity,
            "linear_gflops": round(achieved, 1),
            "gemm_efficiency": round(achieved / gemm[dtype], 3) if dtype in gemm else None,
        })
    s = engine.settings
    return {
        "kind": kind, "model": engine.loaded.source.identifier, "texts": n,
        "long_share": long_share, "real_tokens": real, "max_length": max_len,
        "reference_seconds": round(ref.seconds, 2),
        "gemm_gflops": {k: round(v, 1) for k, v in gemm.items()},
        "linear_flops_per_token": flops_tok,
        "settings": {"max_batch_tokens": s.max_batch_tokens,
                     "min_batch_tokens": s.min_batch_tokens,
                     "max_padding_share": s.max_padding_share,
                     "max_batch_size": s.max_batch_size, "planner_window": s.planner_window},
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": __import__("os").cpu_count(), "python": platform.python_version(),
                    "torch": torch_version, "transformers": tf_version},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": rows,
    }


def print_report(rep: dict[str, Any], log: Callable[[str], None]) -> None:
    """The report as a table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    kind = rep["kind"]
    fid = "min_cosine_to_ref" if kind == "embed" else "max_prob_diff_to_ref"
    t = Table("contender", "s", "texts/s", "tokens/s", "padding", "peak RSS MB (growth)",
              "x sureserve",
              fid.replace("_", " "), "GEMM eff.",
              title=f"{kind}: {rep['texts']} texts, {rep['real_tokens']} real tokens, "
                    f"GEMM {rep['gemm_gflops']} GFLOP/s")
    for r in rep["results"]:
        eff = r["gemm_efficiency"]
        t.add_row(r["name"], f"{r['seconds']:.1f}", f"{r['texts_per_s']:.1f}",
                  f"{r['tokens_per_s']}", f"{r['padding_share']:.1%} of computed",
                  f"{r['peak_rss_mb']} (+{r['rss_growth_mb']})",
                  f"{r['speed_vs_sureserve']:.3f}", f"{r[fid]:.6f}",
                  f"{eff:.0%}" if eff is not None else "-")
    Console(width=200).print(t)
