"""Reranking with a cross-encoder: one relevance score per (query, text) pair.

A cross-encoder is a sequence-classification model with a single output that reads the
query and the text together (``[CLS] query [SEP] text [SEP]`` for BERT, with token types
0 then 1). Pairs are tokenized as pairs, batched by the same planner as every other
input, and cut by the same truncation policy, with one difference: only the text is ever
cut (or chunked), never the query, and a chunked text scores as its best chunk. Scores are
the sigmoid of the logit (sentence-transformers' ``CrossEncoder`` default for one output)
or, with ``raw_scores``, the logit itself.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from sureserve.batching.truncation import Piece, PolicyResult, apply_policy
from sureserve.errors import InputError, InputTooLongError
from sureserve.tasks.base import Task


class RerankTask(Task):
    name = "rerank"
    reduce = "max"  # a text is as relevant as its best chunk

    @property
    def width(self) -> int:
        return 1

    @property
    def uses_token_types(self) -> bool:
        return "token_type_ids" in getattr(self.tokenizer, "model_input_names", ())

    def pair_layout(self, query: str) -> tuple[int, int]:
        """Special and query tokens before a text's content, and special tokens after it,
        read off the tokenizer's own pair template (BERT: [CLS] q [SEP] | t | [SEP])."""
        probe = list(self.tokenizer("x", add_special_tokens=False)["input_ids"])
        pair = list(self.tokenizer(query, "x", add_special_tokens=True)["input_ids"])
        for start in range(len(pair) - len(probe), -1, -1):  # the text's ids, from the end
            if pair[start:start + len(probe)] == probe:
                return start, len(pair) - start - len(probe)
        raise InputError("this tokenizer's pair template could not be read",
                         "use the reranker's own tokenizer")

    def to_pieces(self, texts: Sequence[str], policy: str, *, stride: int = 32,
                  first_index: int = 0, query: str | Sequence[str] | None = None,
                  direction: str = "right", max_text_tokens: int | None = None
                  ) -> PolicyResult:
        """Pairs cut to the limit by cutting the text. ``query``: one for every text, or a
        list with one per text (pairs of many queries in one planner window).
        ``max_text_tokens`` (Cohere's ``max_tokens_per_doc``): a text longer than that is
        cut to it first (reported as truncated), whatever the policy; the policy then
        decides what a pair still over the model's limit becomes."""
        if query is None:
            raise InputError("a reranker scores (query, text) pairs: no query was given",
                             "send a query with the texts")
        queries = [query] * len(texts) if isinstance(query, str) else list(query)
        if len(queries) != len(texts):
            raise InputError(f"{len(queries)} queries for {len(texts)} texts",
                             "send one query per text, or one for all")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"input {first_index + i} is a {type(t).__name__}, not a "
                                 "string", "send text as strings")
        for i, q in enumerate([query] if isinstance(query, str) else queries):
            what = "the query" if isinstance(query, str) else f"the query of pair " \
                f"{first_index + i}"
            if not isinstance(q, str):
                raise InputError(f"{what} is a {type(q).__name__}, not a string",
                                 "send text as strings")
            if not q.strip():
                raise InputError(f"{what} is empty", "send a non-empty query")
        if not texts:
            return PolicyResult([], [], {})
        enc = self.tokenizer(queries, list(texts), add_special_tokens=True,
                             truncation=False, padding=False, return_attention_mask=False,
                             return_token_type_ids=False)
        ids = [list(x) for x in enc["input_ids"]]
        limit = self.loaded.limit
        layouts: dict[str, tuple[int, int]] = {}
        for q in dict.fromkeys(queries):  # each distinct query once
            prefix, suffix = layouts[q] = self.pair_layout(q)
            if prefix + suffix >= limit.value:
                n = len(self.tokenizer(q, add_special_tokens=False)["input_ids"])
                raise InputTooLongError(
                    f"a query is {n} tokens long: with its special tokens it leaves no room "
                    f"for any text within the usable maximum of {limit.value} (set by the "
                    f"{limit.bound_by})", "shorten the query (it is never cut)",
                    length=prefix + suffix, limit=limit.value)
        capped: list[int] = []
        if max_text_tokens is not None:
            for i, q in enumerate(queries):
                prefix, suffix = layouts[q]
                if len(ids[i]) - prefix - suffix > max_text_tokens:
                    seq = ids[i]
                    ids[i] = seq[:prefix + max_text_tokens] + seq[len(seq) - suffix:]
                    capped.append(first_index + i)
        out = PolicyResult([], [], {})
        # one policy call per run of pairs with the same query (each query takes its own
        # room); a run is contiguous, so its texts keep their indices
        for q, run in itertools.groupby(range(len(texts)), key=queries.__getitem__):
            members = list(run)
            prefix, suffix = layouts[q]
            cut = apply_policy([ids[i] for i in members], limit.value, policy, prefix=prefix,
                               suffix=suffix, stride=stride, bound_by=limit.bound_by,
                               first_index=first_index + members[0], direction=direction)
            if self.uses_token_types:
                cut.pieces = [dataclasses.replace(p, segment_at=prefix) for p in cut.pieces]
            out.pieces += cut.pieces
            out.truncated += cut.truncated
            out.chunked.update(cut.chunked)
            out.lengths += cut.lengths
        if capped:  # texts cut to max_text_tokens count as truncated; lengths as sent
            out.truncated = sorted(set(out.truncated) | set(capped))
            for i in capped:
                k = i - first_index
                out.lengths[k] = len(enc["input_ids"][k])
        return out

    def forward(self, pieces: Sequence[Piece]) -> np.ndarray:
        import torch

        feats = self.collate(pieces)
        with torch.inference_mode():
            logits = self.model(**feats).logits  # (batch, 1)
        return logits[:, :1].float().cpu().numpy()

    def postprocess(self, rows: np.ndarray, **options: Any) -> list[float]:
        """One score per text, in input order: sigmoid of the logit, or the logit with
        ``raw_scores=True``."""
        logits = rows[:, 0].astype(np.float64)
        scores = logits if options.get("raw_scores") else 1.0 / (1.0 + np.exp(-logits))
        return [float(s) for s in scores]


def ranked_groups(scores: Sequence[float], groups: Sequence[Sequence[str]],
                  top_n: int | None = None, return_text: bool = False, flags: Any = None
                  ) -> list[list[dict[str, Any]]]:
    """One ``ranked`` list per group of texts, from the scores of every group's texts laid
    end to end (many queries' pairs run together); ``flags`` takes the global index."""
    out, start = [], 0
    for texts in groups:
        shifted = (lambda i, s=start: flags(s + i)) if flags else None
        out.append(ranked(scores[start:start + len(texts)], texts, top_n, return_text,
                          shifted))
        start += len(texts)
    return out


def ranked(scores: Sequence[float], texts: Sequence[str], top_n: int | None = None,
           return_text: bool = False, flags: Any = None) -> list[dict[str, Any]]:
    """``[{"index", "score", "text"?, ...flags}]``, best first (ties: input order)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    out = []
    for i in order[:top_n]:
        item: dict[str, Any] = {"index": i, "score": scores[i]}
        if return_text:
            item["text"] = texts[i]
        if flags is not None:
            item.update(flags(i))
        out.append(item)
    return out
