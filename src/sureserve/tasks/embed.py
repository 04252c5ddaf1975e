"""Sentence embeddings, pooled as the model's sentence-transformers config says."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sureserve.batching.truncation import Piece
from sureserve.tasks.base import Task


class EmbedTask(Task):
    name = "embed"

    @property
    def pooling(self) -> str:
        st = self.loaded.st
        return st.pooling if st else "mean"

    @property
    def normalize_default(self) -> bool:
        st = self.loaded.st
        return st.normalize if st else False

    @property
    def dim(self) -> int:
        return int(self.loaded.config.get("hidden_size", 0))

    def forward(self, pieces: Sequence[Piece]) -> np.ndarray:
        import torch

        feats = self.collate(pieces)
        with torch.inference_mode():
            hidden = self.model(**feats).last_hidden_state  # (batch, seq, hidden)
            pooled = pool(hidden, feats["attention_mask"], self.pooling)  # (batch, hidden)
        return pooled.float().cpu().numpy()

    def postprocess(self, rows: np.ndarray, **options: Any) -> np.ndarray:
        """Normalize to unit length when asked (default: as the model's config says)."""
        normalize = options.get("normalize")
        if normalize is None:
            normalize = self.normalize_default
        if normalize:
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows / np.maximum(norms, 1e-12)
        return rows.astype(np.float32)


def pool(hidden: Any, mask: Any, mode: str) -> Any:
    """Pool token states with the attention mask, so padding never leaks in.

    hidden: (batch, seq, dim); mask: (batch, seq) of 0/1, right-padded.
    """
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1  # right padding: last real token's position
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    summed = (hidden * m).sum(dim=1)
    return summed / m.sum(dim=1).clamp(min=1)
