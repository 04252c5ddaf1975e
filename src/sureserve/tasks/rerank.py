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
                  first_index: int = 0, query: str | None = None,
                  direction: str = "right") -> PolicyResult:
        if query is None:
            raise InputError("a reranker scores (query, text) pairs: no query was given",
                             "send a query with the texts")
        for i, t in enumerate([query, *texts]):
            if not isinstance(t, str):
                what = "the query" if i == 0 else f"input {i - 1}"
                raise InputError(f"{what} is a {type(t).__name__}, not a string",
                                 "send text as strings")
        if not query.strip():
            raise InputError("the query is empty", "send a non-empty query")
        if not texts:
            return PolicyResult([], [], {})
        enc = self.tokenizer([query] * len(texts), list(texts), add_special_tokens=True,
                             truncation=False, padding=False, return_attention_mask=False,
                             return_token_type_ids=False)
        ids = [list(x) for x in enc["input_ids"]]
        q_ids = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        prefix, suffix = self.pair_layout(query)
        limit = self.loaded.limit
        if prefix + suffix >= limit.value:
            raise InputTooLongError(
                f"the query is {len(q_ids)} tokens long: with its special tokens it leaves "
                f"no room for any text within the usable maximum of {limit.value} (set by "
                f"the {limit.bound_by})", "shorten the query (it is never cut)",
                length=prefix + suffix, limit=limit.value)
        cut = apply_policy(ids, limit.value, policy, prefix=prefix, suffix=suffix,
                           stride=stride, bound_by=limit.bound_by, first_index=first_index,
                           direction=direction)
        if self.uses_token_types:
            cut.pieces = [dataclasses.replace(p, segment_at=prefix) for p in cut.pieces]
        return cut

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
