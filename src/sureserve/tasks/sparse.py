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
from dataclasses import dataclass
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
        self._split = split_head(self.model)

    @property
    def width(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def forward(self, pieces: Sequence[Piece]) -> np.ndarray:
        import torch

        feats = self.collate(pieces)
        with torch.inference_mode():
            if self._split is None:  # an architecture whose head we cannot call apart
                logits = self.model(**feats).logits  # (batch, seq, vocab)
                weights = splade_pool(logits, feats["attention_mask"], self.pooling,
                                      self.activation)
            else:
                hidden = self._split.body(**feats).last_hidden_state
                weights = self._pool_real_tokens(hidden, feats["attention_mask"])
        return weights.float().cpu().numpy()

    def _pool_real_tokens(self, hidden: Any, mask: Any) -> Any:
        """The MLM head on real tokens only, ``HEAD_BLOCK`` tokens at a time, each block
        pooled into its texts' rows at once. The head (hidden x vocabulary) is most of a
        small SPLADE model's cost and its logits the largest tensor by far: full padded
        logits of a 4,096-token batch are 500 MB; a block's are 62 MB.

        With max pooling the pooling goes first: log1p and relu never decrease, and the
        output bias is the same for every token, so max over tokens of
        ``log1p(relu(x W + b))`` is ``log1p(relu(max(x W) + b))``, exactly; the
        elementwise work is then per text, not per token (measured: most of the time)."""
        import torch

        split = self._split
        assert split is not None
        flat = hidden.reshape(-1, hidden.shape[-1])
        keep = mask.reshape(-1).bool()
        owner = torch.arange(mask.shape[0], device=mask.device).repeat_interleave(
            mask.shape[1])[keep]
        states = split.transform(flat[keep])
        weight, bias = split.decoder.weight, split.decoder.bias
        first = self.pooling == "max"
        out = torch.full((mask.shape[0], self.width), -torch.inf if first else 0.0,
                         dtype=torch.float32, device=hidden.device)
        for start in range(0, states.shape[0], HEAD_BLOCK):
            w = (states[start:start + HEAD_BLOCK] @ weight.T).float()
            rows = owner[start:start + HEAD_BLOCK].unsqueeze(1).expand(-1, w.shape[1])
            if first:
                out.scatter_reduce_(0, rows, w, "amax")
                continue
            if bias is not None:
                w += bias.float()
            out.scatter_add_(0, rows, activate(w, self.activation))
        if first:
            if bias is not None:
                out += bias.float()
            out = activate(out, self.activation)
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
    w = activate(logits * mask.unsqueeze(-1).to(logits.dtype), activation)
    return w.amax(dim=1) if pooling == "max" else w.sum(dim=1)


def activate(x: Any, activation: str) -> Any:
    """SPLADE's ``log(1 + relu(x))`` (twice for ``log1p_relu``), in place on ``x``."""
    w = x.relu_().log1p_()
    return w.log1p_() if activation == "log1p_relu" else w


@dataclass
class HeadSplit:
    """A masked-LM model in three parts: the encoder body, the head's per-token transform
    (dense, activation, norm) and its output projection onto the vocabulary."""

    body: Any
    transform: Any
    decoder: Any


def split_head(model: Any) -> HeadSplit | None:
    """The parts of a masked-LM model whose head is one per-token module ending in its
    output embeddings (BERT's ``cls``, RoBERTa's ``lm_head``), else None (the model then
    runs whole). The transform is the head with its output projection swapped for an
    identity, on a copy: the model itself is left as it is."""
    import copy

    import torch

    base = getattr(model, "base_model", None)
    decoder = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
        else None
    if base is None or base is model or not isinstance(decoder, torch.nn.Linear):
        return None
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if head is None:
            continue
        path = next((n for n, m in head.named_modules() if m is decoder), None)
        if not path:
            return None
        transform = copy.copy(head)
        transform._modules = dict(head._modules)
        parent, *rest = path.split(".")
        node = transform
        for part in rest:  # copy each module on the way down, so the original keeps its own
            child = copy.copy(getattr(node, parent))
            child._modules = dict(child._modules)
            node._modules[parent] = child
            node, parent = child, part
        node._modules[parent] = torch.nn.Identity()
        return HeadSplit(base, transform, decoder)
    return None

