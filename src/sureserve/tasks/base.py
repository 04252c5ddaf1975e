"""The task skeleton shared by every task: ``preprocess → forward → postprocess``.

Only ``forward`` touches the device, and it runs under ``torch.inference_mode()``. Outputs
of the pieces of one text (chunks, under the chunk policy) are merged by ``merge`` before
``postprocess``: a token-count-weighted mean of the per-piece vectors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from sureserve.batching.truncation import Piece, PolicyResult, apply_policy
from sureserve.errors import InputError
from sureserve.loading.loader import Loaded


class Task(ABC):
    name: ClassVar[str]

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.prefix, self.suffix = special_token_layout(loaded.tokenizer)
        # We tokenize untruncated on purpose and enforce the limit ourselves (naming the
        # text), so silence transformers' generic "sequence longer than maximum" warning.
        warned = getattr(loaded.tokenizer, "deprecation_warnings", None)
        if isinstance(warned, dict):
            warned["sequence-length-is-longer-than-the-specified-maximum"] = True
        pad = loaded.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def preprocess(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize every text once, with its special tokens, untruncated and unpadded.

        Contract: returns one id list per text, in input order. Texts must be strings;
        empty strings are allowed (they become just the special tokens).
        """
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"input {i} is a {type(t).__name__}, not a string",
                                 "send text as strings")
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=False,
                             padding=False, return_attention_mask=False,
                             return_token_type_ids=False)
        return [list(x) for x in enc["input_ids"]]

    #: how the rows of a chunked text's pieces combine (``merge``)
    reduce = "mean"

    def to_pieces(self, texts: Sequence[str], policy: str, *, stride: int = 32,
                  first_index: int = 0, query: str | Sequence[str] | None = None,
                  direction: str = "right", max_text_tokens: int | None = None
                  ) -> PolicyResult:
        """Tokenize once and apply the truncation policy against the usable maximum.

        Shared by offline runs, the server and the gate, so all three cut texts the same way.
        ``query`` and ``max_text_tokens`` are for rerankers (``RerankTask``); other tasks
        refuse them.
        """
        if query is not None or max_text_tokens is not None:
            raise InputError(f"a query was sent to a {self.name} model",
                             "send queries to a reranker (a cross-encoder)")
        limit = self.loaded.limit
        return apply_policy(self.preprocess(texts), limit.value, policy, prefix=self.prefix,
                            suffix=self.suffix, stride=stride, bound_by=limit.bound_by,
                            first_index=first_index, direction=direction)

    @abstractmethod
    def forward(self, pieces: Sequence[Piece]) -> np.ndarray:
        """Run one batch on the device; returns one float32 row per piece, in order."""

    @abstractmethod
    def postprocess(self, rows: np.ndarray, **options: Any) -> Any:
        """Turn merged per-text rows into the user-facing outputs, in the same order."""

    @property
    @abstractmethod
    def width(self) -> int:
        """Length of the row ``forward`` returns per piece."""

    def flag(self, outputs: Any, summary: Any, first_index: int = 0) -> Any:
        """Outputs with each text's truncated/chunks flags, where the output shape has room
        for them (label dicts do; a vector does not: callers take ``summary.flags``)."""
        return outputs

    def collate(self, pieces: Sequence[Piece]) -> dict[str, Any]:
        """Right-padded input_ids and attention_mask tensors for an encoder batch."""
        import torch

        longest = max(len(p.ids) for p in pieces)
        ids = torch.full((len(pieces), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pieces), longest), dtype=torch.long)
        for row, p in enumerate(pieces):
            ids[row, : len(p.ids)] = torch.tensor(p.ids, dtype=torch.long)
            mask[row, : len(p.ids)] = 1
        device = self.loaded.plan.device
        feats = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if any(p.segment_at for p in pieces):  # pairs: 1 from the second segment on
            starts = torch.tensor([p.segment_at for p in pieces]).unsqueeze(1)
            types = (torch.arange(longest).unsqueeze(0) >= starts).long() * mask
            feats["token_type_ids"] = types.to(device)
        return feats


def merge(
    pieces: Sequence[Piece], rows: np.ndarray, n_texts: int, first_index: int = 0,
    reduce: str = "mean",
) -> np.ndarray:
    """Token-count-weighted mean of piece rows per text (``reduce="max"``: the largest,
    a reranker's rule: a text is as relevant as its best chunk, and SPLADE's max pooling;
    ``"sum"``: SPLADE's sum pooling); texts with one piece pass through."""
    if reduce == "max":
        best = np.full((n_texts, rows.shape[1]), -np.inf, dtype=np.float32)
        for p, row in zip(pieces, rows, strict=True):
            k = p.text_index - first_index
            best[k] = np.maximum(best[k], row)
        return best
    out = np.zeros((n_texts, rows.shape[1]), dtype=np.float64)
    weight = np.zeros(n_texts, dtype=np.float64)
    for p, row in zip(pieces, rows, strict=True):
        k = p.text_index - first_index
        w = 1 if reduce == "sum" else p.weight
        out[k] += w * row.astype(np.float64)
        weight[k] += w
    if reduce == "sum":
        return out.astype(np.float32)
    return (out / weight[:, None]).astype(np.float32)


def special_token_layout(tokenizer: Any) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text's content."""
    enc = tokenizer("a", add_special_tokens=True, return_special_tokens_mask=True)
    mask = list(enc["special_tokens_mask"])
    prefix = 0
    while prefix < len(mask) and mask[prefix]:
        prefix += 1
    suffix = 0
    while suffix < len(mask) - prefix and mask[len(mask) - 1 - suffix]:
        suffix += 1
    return prefix, suffix
