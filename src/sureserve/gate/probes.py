"""Probes: run the model on built-in text and judge what comes out.

Thresholds are justified by measurements recorded in BENCHMARKS.md ("gate calibration").
"""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np

from sureserve.gate import probe_texts as P
from sureserve.gate.report import Check
from sureserve.gate.static import max_token_id

# Alignment probe: z-score of related-word similarity above random token pairs.
# Measured (BENCHMARKS.md, gate calibration): matched pairs 3.8-6.0, mismatched -0.0-1.6.
ALIGN_PASS = 3.0
ALIGN_WARN = 2.5
ALIGN_MIN_WORDS = 30
# Unknown-token rate on ordinary English.
UNK_FAIL = 0.05
UNK_WARN = 0.01
# Collapse.
EMBED_COLLAPSE_COS = 0.95
CLASSIFY_COLLAPSE_SPREAD = 0.05
# Absolute tolerances by dtype: batch invariance, packing, and the lockfile's outputs.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}

# Sparse term order: chance that a content word of a probe text outweighs one of its
# stopwords in its sparse vector. Measured (BENCHMARKS.md, gate calibration): splade-tiny
# 0.93 with its own tokenizer, 0.48-0.55 with its token->id map shuffled (5 seeds).
SPARSE_PASS = 0.75
SPARSE_WARN = 0.65
SPARSE_MIN_TEXTS = 3

# LM affinity: shuffled-token loss must exceed the real loss by this many nats per token.
LM_MARGIN = 1.0


def tolerance(precision: str) -> float:
    """Tolerance for a dtype, or for a quantization method (its own, in loading/precision.py)."""
    from sureserve.loading.precision import METHODS

    if precision in TOLERANCE:
        return TOLERANCE[precision]
    return METHODS[precision].tolerance if precision in METHODS else TOLERANCE["float32"]


def word_ids(tok: Any, word: str) -> list[int]:
    """Ids of ``word`` as it appears inside running text (after a space).

    Byte-level BPE and SentencePiece vocabularies store the in-text form with a space
    marker ('Ġword', '▁word'), so the word is tokenized after a space; a bare leading-space
    token, if the tokenizer emits one, is dropped.
    """
    ids = list(tok(" " + word, add_special_tokens=False)["input_ids"])
    while len(ids) > 1 and tok.decode(ids[:1]).strip() == "":
        ids = ids[1:]
    return ids


def alignment_score(tok: Any, emb: np.ndarray, seed: int = 0) -> tuple[float, int, int]:
    """(z-score, words used, groups used) of related-word closeness in input embeddings.

    Rows are mean-centred (the shared offset common to all rows would otherwise make every
    pair look similar). A word split into several tokens is the mean of its pieces' rows.
    z = (mean cosine within groups - mean cosine of random token pairs) / std of the latter.
    """
    rows = emb.shape[0]
    centred_mean = emb.mean(axis=0)
    special = set(tok.all_special_ids)
    groups: list[np.ndarray] = []
    words = 0
    for members in P.WORD_GROUPS.values():
        vecs = []
        for w in members:
            ids = [i for i in word_ids(tok, w) if i < rows and i not in special]
            if ids:
                vecs.append(emb[ids].mean(axis=0) - centred_mean)
        if len(vecs) >= 3:
            groups.append(_unit(np.stack(vecs)))
            words += len(vecs)
    if not groups:
        return 0.0, 0, 0
    within = np.concatenate([(g @ g.T)[np.triu_indices(len(g), 1)] for g in groups])
    rng = random.Random(seed)
    top = min(rows, max_token_id(tok) + 1)
    candidates = [i for i in rng.sample(range(top), min(top, 4000)) if i not in special]
    a = _unit(emb[candidates[: len(candidates) // 2]] - centred_mean)
    b = _unit(emb[candidates[len(candidates) // 2: 2 * (len(candidates) // 2)]] - centred_mean)
    rand = (a * b).sum(axis=1)
    z = (float(within.mean()) - float(rand.mean())) / max(float(rand.std()), 1e-9)
    return z, words, len(groups)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def check_alignment(tok: Any, emb: np.ndarray) -> Check:
    z, words, groups = alignment_score(tok, emb)
    evidence = (f"related words ({words} words in {groups} groups) are {z:.1f} standard "
                "deviations closer in the input embeddings than random token pairs")
    fix = ("the tokenizer's token→id map does not match the one the model was trained with: "
           "use the tokenizer saved with the model")
    if words < ALIGN_MIN_WORDS:
        return Check("alignment", "warn", f"only {words} probe words map into this vocabulary; "
                     "too few to judge the tokenizer", "")
    return _graded("alignment", z, ALIGN_PASS, ALIGN_WARN, evidence, fix,
                   f" (pass >= {ALIGN_PASS})", f" (a matched pair scores >= {ALIGN_PASS})")


def _graded(name: str, score: float, pass_at: float, warn_at: float, evidence: str, fix: str,
            warn_note: str, fail_note: str) -> Check:
    """pass at ``pass_at`` and above, warn from ``warn_at``, fail below (the notes say
    where the bar is)."""
    if score >= pass_at:
        return Check(name, "pass", evidence)
    if score >= warn_at:
        return Check(name, "warn", evidence + warn_note, fix)
    return Check(name, "fail", evidence + fail_note, fix)


def check_unknown_rate(tok: Any) -> Check:
    ids = tok(P.PARAGRAPH, add_special_tokens=False)["input_ids"]
    unk = tok.unk_token_id
    n_unk = sum(1 for i in ids if unk is not None and i == unk)
    rate = n_unk / max(len(ids), 1)
    evidence = f"{n_unk} of {len(ids)} tokens of ordinary English are unknown ({rate:.1%})"
    if rate > UNK_FAIL:
        return Check("unknown-tokens", "fail", evidence,
                     "wrong tokenizer or wrong casing: use the model's own tokenizer")
    if rate > UNK_WARN:
        return Check("unknown-tokens", "warn", evidence, "check the tokenizer's casing")
    return Check("unknown-tokens", "pass", evidence)


def check_round_trip(tok: Any) -> Check:
    """Probe texts must give content ids (not just special tokens) and decode back to
    themselves, up to spacing (and case, for a tokenizer that lowercases)."""
    from sureserve.gate.static import lowercases

    texts = [*P.DIVERSE, P.PARAGRAPH]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    empty = [k for k, row in enumerate(ids) if not row]
    if empty:
        return Check("empty-ids", "fail", f"{len(empty)} of {len(texts)} probe texts give no "
                     f"token ids (e.g. {texts[empty[0]][:40]!r} -> [])",
                     "the tokenizer deletes the text (its normalizer or pre-tokenizer is "
                     "broken): use the model's own tokenizer files")
    lower = bool(lowercases(tok))

    def squash(t: str) -> str:
        t = "".join(t.split())
        return t.lower() if lower else t

    bad = [(t, tok.decode(row)) for t, row in zip(texts, ids, strict=True)
           if squash(tok.decode(row, skip_special_tokens=True)) != squash(t)]
    evidence = f"{len(texts)} probe texts give ids and {len(texts) - len(bad)} decode back"
    if bad:
        t, back = bad[0]
        return Check("empty-ids", "warn", f"{evidence}; e.g. {t[:40]!r} -> {back[:40]!r}",
                     "the tokenizer loses characters: check its normalizer, or that the "
                     "texts are in a script its vocabulary covers")
    return Check("empty-ids", "pass", evidence + " (up to spacing" +
                 (" and case)" if lower else ")"))


def check_embed_collapse(vecs: np.ndarray) -> Check:
    u = _unit(vecs)
    sims = (u @ u.T)[np.triu_indices(len(u), 1)]
    evidence = (f"mean cosine between {len(u)} unrelated probe texts {sims.mean():.3f} "
                f"(max {sims.max():.3f})")
    if sims.mean() > EMBED_COLLAPSE_COS:
        return Check("output-collapse", "fail", evidence + f" > {EMBED_COLLAPSE_COS}: "
                     "every text maps to nearly the same vector",
                     "check the tokenizer and the weights (see the other checks)")
    return Check("output-collapse", "pass", evidence)


def check_classify_collapse(probs: np.ndarray, labels: list[str]) -> Check:
    top = probs.argmax(axis=1)
    counts = {labels[i]: int((top == i).sum()) for i in sorted(set(top.tolist()))}
    spread = float(probs.max(axis=1).max() - probs.max(axis=1).min())
    evidence = (f"labels over {len(probs)} diverse probe texts: {counts}; "
                f"top-score spread {spread:.3f}")
    if len(counts) == 1 and spread < CLASSIFY_COLLAPSE_SPREAD:
        return Check("output-collapse", "fail", evidence + ": one label with near-identical "
                     "scores for everything", "check the tokenizer and the classifier weights")
    if len(counts) == 1:
        return Check("output-collapse", "warn", evidence + ": one label for every probe text",
                     "check that the model suits these texts")
    return Check("output-collapse", "pass", evidence)


def check_generate_collapse(next_tokens: list[str]) -> Check:
    distinct = len(set(next_tokens))
    evidence = f"greedy next tokens for {len(next_tokens)} prompts: {next_tokens!r}"
    if distinct == 1:
        return Check("output-collapse", "fail", evidence + ": the same token whatever the prompt",
                     "check the tokenizer and the weights")
    return Check("output-collapse", "pass", evidence)


def check_invariance(alone: np.ndarray, batched: np.ndarray, dtype: str, what: str) -> Check:
    tol = tolerance(dtype)
    diff = float(np.abs(alone - batched).max())
    evidence = (f"largest difference of {what} alone vs inside a padded batch of very "
                f"different lengths: {diff:.2e} (tolerance {tol:g} for {dtype})")
    if diff > tol:
        return Check("batch-invariance", "fail", evidence,
                     "padding leaks into outputs: check the attention mask, padding side and "
                     "position ids (for decoders: left padding with positions from the mask)")
    return Check("batch-invariance", "pass", evidence)


RERANK_PASS = 0.75  # share of probe queries whose own passage must rank first
RERANK_WARN = 0.5


def check_rerank_order(scores: np.ndarray) -> Check:
    """``scores[q, p]``: query q against passage p; passage q is query q's own."""
    n = scores.shape[0]
    first = int(sum(int(np.argmax(scores[q]) == q) for q in range(n)))
    spread = float(scores.max() - scores.min())
    evidence = (f"{first} of {n} probe queries score their own passage above the other "
                f"{n - 1} (scores span {spread:.3g})")
    share = first / n
    if share < RERANK_WARN:
        return Check("rerank-order", "fail", evidence + ": the model does not read the pairs",
                     "use the tokenizer saved with the model; check that it is a cross-encoder "
                     "trained for relevance")
    if share < RERANK_PASS:
        return Check("rerank-order", "warn", evidence, "check the model on your own queries")
    return Check("rerank-order", "pass", evidence)


def check_lm_affinity(loss: float, shuffled: float) -> Check:
    evidence = (f"loss on a reference paragraph {loss:.2f} nats/token, on the same tokens "
                f"shuffled {shuffled:.2f} (needs a margin of {LM_MARGIN})")
    if shuffled - loss < LM_MARGIN:
        return Check("lm-affinity", "fail", evidence + ": the model does not read this text as "
                     "language", "use the tokenizer saved with the model")
    return Check("lm-affinity", "pass", evidence)


def content_over_stopwords(tok: Any, texts: list[str], rows: np.ndarray) -> tuple[float, int]:
    """(mean over texts of P(content word's weight > stopword's weight), texts scored).

    A word's weight is the largest of its tokens' weights in the text's sparse row (its
    vocabulary-wide vector); words under 3 letters that are not stopwords are left out."""
    width = rows.shape[1]
    scores = []
    for text, row in zip(texts, rows, strict=True):
        content, stop = [], []
        for w in re.findall(r"[a-z]+", text.lower()):
            ids = [i for i in word_ids(tok, w) if i < width]
            if not ids:
                continue
            weight = float(row[ids].max())
            if w in P.STOPWORDS:
                stop.append(weight)
            elif len(w) > 2:
                content.append(weight)
        if content and stop:
            c, s_ = np.asarray(content)[:, None], np.asarray(stop)[None, :]
            scores.append(float(((c > s_) + 0.5 * (c == s_)).mean()))
    return (float(np.mean(scores)) if scores else 0.0), len(scores)


def check_sparse_terms(tok: Any, texts: list[str], rows: np.ndarray) -> Check:
    """A sparse model's strongest terms must be a text's own content words, not its
    stopwords: the sparse form of 'does the model read these token ids as language'."""
    share, n = content_over_stopwords(tok, texts, rows)
    evidence = (f"in {n} probe texts a content word outweighs a stopword of the same text "
                f"{share:.0%} of the time")
    fix = ("the model does not read this tokenizer's ids as the words they spell: use the "
           "tokenizer saved with the model")
    if n < SPARSE_MIN_TEXTS:
        return Check("sparse-terms", "warn", f"only {n} probe texts have words in this "
                     "vocabulary; too few to judge", "")
    return _graded("sparse-terms", share, SPARSE_PASS, SPARSE_WARN, evidence, fix,
                   f" (pass >= {SPARSE_PASS:.0%})", f" (a matched pair: >= {SPARSE_PASS:.0%})")


def check_sparse_active(rows: np.ndarray) -> Check:
    """Every probe text must keep some terms: all-zero vectors match nothing."""
    active = (rows > 0).sum(axis=1)
    evidence = (f"non-zero terms per probe text: min {int(active.min())}, median "
                f"{int(np.median(active))}, max {int(active.max())} of {rows.shape[1]}")
    if active.min() == 0:
        return Check("output-collapse", "fail", evidence + ": a text with no terms matches "
                     "nothing", "check the weights and the tokenizer (see the other checks)")
    return Check("output-collapse", "pass", evidence)
