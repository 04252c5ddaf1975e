"""Lockfile and verify: catch upgrade regressions before they are deployed.

``write_lock`` records what a model *is* (file hashes, source, revision), what it runs on
(library versions), how its tokenizer behaves (ids of the probe texts, normalizer and
pre-tokenizer settings) and what it answers (golden outputs on the probe texts, with
tolerances). ``verify`` recomputes all of it and sorts the differences into four kinds:
files, tokenizer ids, library versions, output drift. Only the two that change answers
(tokenizer ids and output drift) make verify fail; changed files or versions with
identical behaviour are reported, not failed.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.gate import probe_texts as P
from sureserve.gate.probes import tolerance
from sureserve.gate.report import Check

LOCK_VERSION = 1
PROBE_TEXTS = [P.PARAGRAPH, *P.DIVERSE]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    from sureserve.version import __version__

    return {"sureserve": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "python": platform.python_version()}


def tokenizer_fingerprint(tok: Any) -> dict[str, Any]:
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    return {
        "class": type(tok).__name__,
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "special_tokens": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "probe_ids": [list(tok(t)["input_ids"]) for t in PROBE_TEXTS],
    }


def golden_outputs(engine: Any) -> dict[str, Any]:
    """What the model answers on the probe texts, as plain lists."""
    dtype = engine.loaded.precision
    tol = tolerance(dtype)
    if engine.task_name == "embed":
        vecs = engine.embed(PROBE_TEXTS, truncation="truncate")
        return {"kind": "embeddings", "dtype": dtype, "tolerance": tol,
                "values": np.round(vecs, 6).tolist()}
    if engine.task_name == "classify":
        rows = engine.run(PROBE_TEXTS, truncation="truncate").rows
        return {"kind": "probabilities", "dtype": dtype, "tolerance": tol,
                "values": np.round(engine.task.probabilities(rows), 6).tolist()}
    if engine.task_name == "sparse":
        # the weights of the probe texts' own tokens (a fixed set for a given tokenizer,
        # which the lock fingerprints apart): the terms a sparse index matches on most
        rows = engine.run(PROBE_TEXTS, truncation="truncate").rows
        ids = sorted({i for t in PROBE_TEXTS for i in engine.tokenizer(t)["input_ids"]})
        return {"kind": "sparse weights of the texts' own tokens", "dtype": dtype,
                "tolerance": tol, "values": np.round(rows[:, ids], 6).tolist()}
    if engine.task_name == "rerank":
        query, _ = P.RERANK_PAIRS[0]
        rows = engine.run([p for _, p in P.RERANK_PAIRS], truncation="truncate",
                          query=query).rows
        return {"kind": "relevance logits", "dtype": dtype, "tolerance": tol,
                "values": np.round(rows, 6).tolist()}
    return _decoder_golden(engine, dtype, tol)


def _decoder_golden(engine: Any, dtype: str, tol: float) -> dict[str, Any]:
    import torch

    model, tok = engine.model, engine.tokenizer
    probs = []
    with torch.inference_mode():
        for prompt in P.PROMPTS:
            ids = torch.tensor([tok(prompt)["input_ids"]], device=engine.loaded.plan.device)
            p = model(input_ids=ids).logits[0, -1].float().softmax(-1)
            top = torch.topk(p, 5)
            probs.append({"ids": top.indices.tolist(),
                          "probs": [round(float(x), 6) for x in top.values]})
    return {"kind": "next-token top-5", "dtype": dtype, "tolerance": tol * 10, "values": probs}


def check_quantization(engine: Any) -> Check | None:
    """For a quantized model: evaluated or not, and — for a folder written by ``sureserve
    quantize`` — whether the re-applied recipe still answers as it did when accepted."""
    recipe = engine.loaded.quantization
    if recipe is None or (recipe.evaluated and not recipe.golden):
        return None  # not quantized, or a candidate being measured right now
    if not recipe.evaluated:
        return Check("quantization", "warn", f"{recipe.method} applied at load, never "
                     "measured on your data", "run `sureserve quantize MODEL --eval FILE "
                     f"--methods {recipe.method} -o DIR` and load DIR")
    rep = VerifyReport()
    _diff_outputs(recipe.golden, golden_outputs(engine), rep)
    evidence = (f"{recipe.method} re-applied: largest difference from the outputs measured "
                f"when it was accepted {rep.max_drift:.2e} (tolerance "
                f"{float(recipe.golden['tolerance']):g})")
    if rep.outputs:
        return Check("quantization", "fail", evidence + ": " + "; ".join(rep.outputs[:3]),
                     "this machine's kernels or libraries answer differently: run "
                     "`sureserve quantize` again here")
    return Check("quantization", "pass", evidence)


def write_lock(engine: Any, out: Path) -> dict[str, Any]:
    loaded = engine.loaded
    src, tsrc = loaded.source, loaded.tokenizer_source
    lock = {
        "sureserve_lock": LOCK_VERSION,
        "model": {"identifier": src.identifier, "kind": src.kind, "revision": src.revision,
                  "snapshot": src.path.name if src.kind.startswith("hub") else None,
                  "task": loaded.task_name},
        "tokenizer_source": None if tsrc.path == src.path else tsrc.identifier,
        "files": file_hashes(src.path),
        "tokenizer_files": file_hashes(tsrc.path) if tsrc.path != src.path else None,
        "versions": versions(),
        "plan": {"device": loaded.plan.device, "dtype": loaded.plan.dtype,
                 "quantization": loaded.quantization.summary()
                 if loaded.quantization else None},
        "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
        "outputs": golden_outputs(engine),
    }
    out.write_text(json.dumps(lock, indent=1) + "\n", encoding="utf-8")
    return lock


@dataclass
class VerifyReport:
    files: list[str] = field(default_factory=list)
    tokenizer: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    max_drift: float = 0.0

    @property
    def ok(self) -> bool:
        """Outputs and token ids agree (files or versions may have changed)."""
        return not self.tokenizer and not self.outputs

    def render(self, console: Any) -> None:
        for title, items in (("a file changed", self.files),
                             ("the tokenizer now produces different ids", self.tokenizer),
                             ("library versions changed", self.versions),
                             ("outputs drifted beyond tolerance", self.outputs)):
            console.print(f"{'[green]ok[/]' if not items else f'[yellow]{len(items)}[/]'} "
                          f"{title}")
            for item in items:
                console.print(f"    {item}", highlight=False)
        console.print(f"largest output difference: {self.max_drift:.2e}")
        console.print("[green]verified[/]" if self.ok else "[bold red]NOT verified[/]")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "files_changed": self.files, "tokenizer_changed": self.tokenizer,
                "versions_changed": self.versions, "outputs_drifted": self.outputs,
                "max_drift": self.max_drift}


def _diff_files(old: dict[str, str], new: dict[str, str], what: str) -> list[str]:
    out = [f"{what} {n}: changed" for n in sorted(old) if n in new and new[n] != old[n]]
    out += [f"{what} {n}: missing" for n in sorted(old) if n not in new]
    out += [f"{what} {n}: added" for n in sorted(new) if n not in old]
    return out


def verify(lock: dict[str, Any], engine: Any) -> VerifyReport:
    rep = VerifyReport()
    loaded = engine.loaded
    rep.files = _diff_files(lock["files"], file_hashes(loaded.source.path), "file")
    if lock.get("tokenizer_files"):
        rep.files += _diff_files(lock["tokenizer_files"],
                                 file_hashes(loaded.tokenizer_source.path), "tokenizer file")
    now = versions()
    rep.versions = [f"{k}: {v} -> {now.get(k)}" for k, v in lock["versions"].items()
                    if now.get(k) != v]
    fp_old, fp_new = lock["tokenizer"], tokenizer_fingerprint(loaded.tokenizer)
    for i, (a, b) in enumerate(zip(fp_old["probe_ids"], fp_new["probe_ids"], strict=True)):
        if a != b:
            rep.tokenizer.append(f"probe text {i}: {len(a)} ids -> {len(b)} ids, first "
                                 f"difference at position {_first_diff(a, b)}")
    for key in ("normalizer", "pre_tokenizer", "special_tokens"):
        if fp_old.get(key) != fp_new.get(key):
            rep.tokenizer.append(f"{key} settings changed")
    old_q = (lock.get("plan") or {}).get("quantization") or {}
    new_q = loaded.quantization
    if old_q.get("method") != (new_q.method if new_q else None):
        rep.outputs.append(f"quantization {old_q.get('method') or 'none'} -> "
                           f"{new_q.method if new_q else 'none'}")
    _diff_outputs(lock["outputs"], golden_outputs(engine), rep)
    return rep


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def _diff_outputs(old: dict[str, Any], new: dict[str, Any], rep: VerifyReport) -> None:
    tol = float(old["tolerance"])
    if old["kind"] == "next-token top-5":
        for i, (a, b) in enumerate(zip(old["values"], new["values"], strict=True)):
            if a["ids"][0] != b["ids"][0]:
                rep.outputs.append(f"prompt {i}: greedy next token {a['ids'][0]} -> "
                                   f"{b['ids'][0]}")
            drift = abs(a["probs"][0] - b["probs"][0])
            rep.max_drift = max(rep.max_drift, drift)
            if drift > tol:
                rep.outputs.append(f"prompt {i}: top probability drifted by {drift:.2e} "
                                   f"(tolerance {tol:g})")
        return
    a, b = np.asarray(old["values"]), np.asarray(new["values"])
    if a.shape != b.shape:  # another tokenizer: its ids differ (its fingerprint says how)
        rep.outputs.append(f"{old['kind']}: {a.shape} values locked, {b.shape} now")
        rep.max_drift = float("inf")
        return
    drift = np.abs(a - b).max(axis=1)
    rep.max_drift = float(drift.max())
    for i, d in enumerate(drift):
        if d > tol:
            rep.outputs.append(f"probe text {i}: {old['kind']} drifted by {d:.2e} "
                               f"(tolerance {tol:g})")
