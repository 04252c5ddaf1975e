"""Sparse (SPLADE) embeddings from a masked-LM head: one weight per vocabulary term.

As SPLADE defines it (and sentence-transformers' ``SpladePooling`` computes it): the MLM
logits of every real token (padding masked out) go through ``log(1 + relu(x))`` (twice for
the ``log1p_relu`` activation), then are max-pooled (or summed) over the tokens. A text
becomes a vector over the vocabulary that is zero almost everywhere; only its non-zero
terms are returned, strongest first, optionally pruned to the ``top_k`` strongest.

``forward`` returns the dense vocabulary-wide row (the shape every task shares, so the
planner, batcher and truncation policy need nothing new); a chunked text's pieces combine
as the pooling does (max, or sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sureserve.batching.truncation import Piece
from sureserve.tasks.base import Task

Term = dict[str, Any]  # {"index": token id, "value": weight[, "token": text]}
HEAD_BLOCK = 512  # tokens through the MLM head at once (see SparseTask._pool_real_tokens)


class SparseTask(Task):
    name = "sparse"

    def __init__(self, loaded: Any) -> None:
        super().__init__(loaded)
        st = loaded.st
        splade: tuple[str, str] = st.splade if st is not None and st.splade else ("max",
                                                                                 "relu")
        self.pooling, self.activation = splade
        self.reduce = "sum" if self.pooling == "sum" else "max"

    @property
    def width(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def forward(self, pieces: Sequence[Piece]) -> np.ndarray:
        import torch

        feats = self.collate(pieces)
        base, head = _body_and_head(self.model)
        with torch.inference_mode():
            if base is None:  # an architecture whose head we cannot call apart
                logits = self.model(**feats).logits  # (batch, seq, vocab)
                weights = splade_pool(logits, feats["attention_mask"], self.pooling,
                                      self.activation)
            else:
                hidden = base(**feats).last_hidden_state
                weights = self._pool_real_tokens(hidden, feats["attention_mask"], head)
        return weights.float().cpu().numpy()

    def _pool_real_tokens(self, hidden: Any, mask: Any, head: Any) -> Any:
        """The MLM head on real tokens only, ``HEAD_BLOCK`` tokens at a time, each block
        pooled into its texts' rows at once. The head (hidden x vocabulary) is most of a
        small SPLADE model's cost and its logits the largest tensor by far: full padded
        logits of a 4,096-token batch are 500 MB; a block's are 62 MB."""
        import torch

        flat = hidden.reshape(-1, hidden.shape[-1])
        keep = mask.reshape(-1).bool()
        owner = torch.arange(mask.shape[0], device=mask.device).repeat_interleave(
            mask.shape[1])[keep]
        states = flat[keep]
        out = torch.zeros((mask.shape[0], self.width), dtype=torch.float32,
                          device=hidden.device)
        for start in range(0, states.shape[0], HEAD_BLOCK):
            w = head(states[start:start + HEAD_BLOCK]).float().relu_().log1p_()
            if self.activation == "log1p_relu":
                w = w.log1p_()
            rows = owner[start:start + HEAD_BLOCK].unsqueeze(1).expand(-1, w.shape[1])
            if self.pooling == "max":  # weights are >= 0: the zeros are a neutral start
                out.scatter_reduce_(0, rows, w, "amax")
            else:
                out.scatter_add_(0, rows, w)
        return out

    def postprocess(self, rows: np.ndarray, **options: Any) -> list[list[Term]]:
        """Each text's non-zero terms, strongest first (ties by token id): ``top_k`` keeps
        the strongest only (None or 0: all); ``tokens=True`` adds each term's token text."""
        top_k = options.get("top_k") or None
        with_tokens = bool(options.get("tokens"))
        out: list[list[Term]] = []
        for row in rows:
            idx = np.flatnonzero(row > 0)
            order = idx[np.lexsort((idx, -row[idx]))][:top_k]
            terms: list[Term] = [{"index": int(i), "value": float(row[i])} for i in order]
            if with_tokens and terms:
                names = self.tokenizer.convert_ids_to_tokens([t["index"] for t in terms])
                for t, name in zip(terms, names, strict=True):
                    t["token"] = name
            out.append(terms)
        return out


def splade_pool(logits: Any, mask: Any, pooling: str = "max", activation: str = "relu") -> Any:
    """(batch, seq, vocab) MLM logits -> (batch, vocab) SPLADE weights; padding never
    contributes (its rows are zeroed before the pooling, and every weight is >= 0)."""
    w = (logits * mask.unsqueeze(-1).to(logits.dtype)).relu().log1p_()
    if activation == "log1p_relu":
        w = w.log1p_()
    return w.amax(dim=1) if pooling == "max" else w.sum(dim=1)


def _body_and_head(model: Any) -> tuple[Any, Any]:
    """(encoder body, MLM head) of a masked-LM model whose head is one module applied per
    token (BERT's ``cls``, RoBERTa's ``lm_head``), else (None, None)."""
    base = getattr(model, "base_model", None)
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if head is not None and base is not None and base is not model:
            return base, head
    return None, None


def active_terms(rows: np.ndarray) -> np.ndarray:
    """Non-zero terms per text (the drift watch's and the gate's sparsity figure)."""
    return (rows > 0).sum(axis=1)
