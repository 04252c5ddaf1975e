"""``sureserve bench quantize``: ``sureserve quantize`` on the packaged models and realistic
data, with the peers in the same run.

- minilm on the realistic mix (VADER tweets / reviews / editorials, a share of BBC
  articles): every candidate against sureserve's fp32 engine; sentence-transformers (torch)
  in-process; when their venvs are given, sentence-transformers' ONNX Runtime dynamic int8
  and OpenVINO static int8 exports (``bench/peer_st.py``, calibrated on the same
  calibration slice that sureserve's search uses, measured on the same eval split).
- sentiment-demo on held-out labelled movie sentences (never trained on): accuracy and
  its drop per candidate.
- smollm2: every candidate, then decode tokens/s at 1 and 32 concurrent prompts for the
  fp32 baseline and each accepted candidate, with greedy agreement.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.quantize import measure as M
from sureserve.quantize.evalset import split
from sureserve.quantize.run import quantize
from sureserve.settings import Settings

PEER_SCRIPT = Path(__file__).with_name("peer_st.py")
DECODE_TOKENS = 64


def _embed_part(n: int, long_share: float, seed: int, peers: dict[str, str],
                log: Callable[[str], None]) -> dict[str, Any]:
    import sureserve
    from sureserve.zoo.corpora import realistic_mix

    texts = realistic_mix(n, long_share, seed)
    rep = quantize("minilm", texts, say=log, settings=Settings(truncation="truncate"))
    calib_idx, eval_idx = split(len(texts), "embed")
    ev, calib = [texts[i] for i in eval_idx], [texts[i] for i in calib_idx]
    engine = sureserve.load("minilm", truncation="truncate")
    engine.embed(ev[:32])
    start = time.perf_counter()
    ref = engine.embed(ev)
    ours = len(ev) / (time.perf_counter() - start)
    rows: list[dict[str, Any]] = [{"name": "sureserve fp32", "texts_per_s": round(ours, 1),
                                   "vs_sureserve": 1.0, "min_cosine": 1.0}]
    for c in rep["candidates"]:
        if c["speedup"] is not None:
            rows.append({"name": f"sureserve {c['method']} ({c['status']})",
                         "texts_per_s": round(rep["baseline"]["per_second"] * c["speedup"], 1),
                         "vs_sureserve": c["speedup"], "min_cosine": c["min_cosine"],
                         "p1_cosine": c["p1_cosine"],
                         "neighbour_overlap": c["neighbour_overlap"]})
    rows.append(_st_torch(engine, ev, ref, ours))
    for backend, python in peers.items():
        rows.extend(_peer(backend, python, str(engine.loaded.source.path), ev, calib, ref, ours,
                          log))
    return {"texts": len(texts), "eval_texts": len(ev), "long_share": long_share,
            "quantize": rep, "side_by_side": rows}


def _fid(ref: np.ndarray, vecs: np.ndarray) -> dict[str, Any]:
    f = M.embed_fidelity(ref, vecs)
    return {"min_cosine": round(f["min_cosine"], 5), "p1_cosine": round(f["p1_cosine"], 5),
            "neighbour_overlap": round(f["neighbour_overlap"] or 0, 3)}


def _st_torch(engine: Any, ev: list[str], ref: np.ndarray, ours: float) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(engine.loaded.source.path), device="cpu")
    st.encode(ev[:32], batch_size=32)
    start = time.perf_counter()
    vecs = st.encode(ev, batch_size=32)
    rate = len(ev) / (time.perf_counter() - start)
    return {"name": "sentence-transformers torch fp32", "texts_per_s": round(rate, 1),
            "vs_sureserve": round(rate / ours, 3), **_fid(ref, np.asarray(vecs))}


def _peer(backend: str, python: str, model: str, ev: list[str], calib: list[str],
          ref: np.ndarray, ours: float, log: Callable[[str], None]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "texts.json").write_text(json.dumps(ev))
        (t / "calib.json").write_text(json.dumps(calib))
        log(f"peer: sentence-transformers {backend} export (its own venv: {python})")
        proc = subprocess.run([python, str(PEER_SCRIPT), "--backend", backend, "--model", model,
                               "--texts", str(t / "texts.json"), "--calib",
                               str(t / "calib.json"), "--out", str(t / "out")],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            return [{"name": f"sentence-transformers {backend}", "error":
                     proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}]
        res = json.loads((t / "out" / "result.json").read_text())
        out = []
        for kind in ("fp32", "int8"):
            vecs = np.load(t / "out" / f"{kind}.npy")
            rate = float(res[f"{kind}_texts_per_s"])
            label = "dynamic int8" if backend == "onnx" else "static int8"
            out.append({"name": f"sentence-transformers {backend} "
                                f"{'fp32' if kind == 'fp32' else label}",
                        "texts_per_s": round(rate, 1), "vs_sureserve": round(rate / ours, 3),
                        "versions": res.get("versions"), **_fid(ref, vecs)})
        return out


def _classify_part(n: int, log: Callable[[str], None]) -> dict[str, Any]:
    from sureserve.zoo.corpora import load_vader
    from sureserve.zoo.sentiment import split as sentiment_split

    _, held = sentiment_split(load_vader("movieReviewSnippets"))
    held = held[:n]
    texts = [r.text for r in held]
    labels = ["POSITIVE" if r.score > 0 else "NEGATIVE" for r in held]
    return quantize("sentiment-demo", texts, labels, say=log,
                    settings=Settings(truncation="truncate"))


def _decode_rate(engine: Any, prompts: Sequence[str], clients: int) -> tuple[float, list[Any]]:
    batch = list(prompts[:clients])
    engine.complete(batch[:1], max_new_tokens=4)  # warm-up
    start = time.perf_counter()
    done = engine.complete(batch, max_new_tokens=DECODE_TOKENS, temperature=0.0)
    tokens = sum(c.completion_tokens for c in done)
    return tokens / (time.perf_counter() - start), [c.token_ids for c in done]


def _generate_part(n: int, log: Callable[[str], None]) -> dict[str, Any]:
    import sureserve
    from sureserve.api import _load_and_gate
    from sureserve.loading.precision import Recipe
    from sureserve.zoo.corpora import load_vader

    texts = [r.text for r in load_vader("nytEditorialSnippets")[:n]]
    rep = quantize("smollm2", texts, say=log)
    prompts = [r.text for r in load_vader("tweets")[:32]]
    base = sureserve.load("smollm2")
    speeds: list[dict[str, Any]] = []
    ref: dict[int, list[Any]] = {}
    for clients in (1, 32):
        rate, ref[clients] = _decode_rate(base, prompts, clients)
        speeds.append({"method": "fp32", "clients": clients, "tokens_per_s": round(rate, 2)})
    for c in rep["candidates"]:
        if c["status"] != "accepted":
            continue
        engine, _ = _load_and_gate("smollm2", None, None, None, Settings(),
                                   Recipe(c["method"], tuple(c["full_precision_layers"]), True))
        for clients in (1, 32):
            rate, toks = _decode_rate(engine, prompts, clients)
            same = float(np.mean([a == b for a, b in zip(ref[clients], toks, strict=True)]))
            speeds.append({"method": c["method"], "clients": clients,
                           "tokens_per_s": round(rate, 2), "greedy_agreement": round(same, 3)})
    return {"quantize": rep, "decode": speeds, "decode_tokens": DECODE_TOKENS}


def run_bench(n: int = 1200, long_share: float = 0.1, seed: int = 11,
              peers: dict[str, str] | None = None, parts: Sequence[str] = ("embed", "classify",
                                                                           "generate"),
              out: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch
    import transformers

    from sureserve.loading.machine import cpu_speeds

    report: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_gflops": cpu_speeds(Settings().home_dir())}
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "embed": lambda: _embed_part(n, long_share, seed, peers or {}, log),
        "classify": lambda: _classify_part(600, log),
        "generate": lambda: _generate_part(200, log)}
    for name, step in steps.items():
        if name in parts:
            report[name] = step()
            if out:  # after each part: a long run that is stopped keeps what it measured
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def print_report(rep: dict[str, Any], log: Callable[[str], None]) -> None:
    log(f"matmul GFLOP/s on this CPU: {rep['cpu_gflops']}")
    for part in ("embed", "classify", "generate"):
        if part not in rep:
            continue
        q = rep[part] if part == "classify" else rep[part]["quantize"]
        log(f"--- {part}: {q['model']}, baseline {q['baseline']['per_second']} "
            f"{q['baseline']['unit']}; chosen: {q['chosen']}")
        for c in q["candidates"]:
            log(f"  {c['method']:18} {c['status']:9} speedup {c['speedup']} "
                f"min_cos {c['min_cosine']} agree {c['agreement']} drop {c['accuracy_drop']} "
                f"ppl+ {c['perplexity_increase']} fp32 layers "
                f"{len(c['full_precision_layers'])}: {c['reason']}")
        if part == "embed":
            for r in rep["embed"]["side_by_side"]:
                log(f"  {r}")
        if part == "generate":
            for r in rep["generate"]["decode"]:
                log(f"  decode {r}")
