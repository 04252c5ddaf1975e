"""Sequence classification: softmax or sigmoid as the config's problem type says."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sureserve.batching.truncation import Piece
from sureserve.tasks.base import Task


class ClassifyTask(Task):
    name = "classify"

    @property
    def labels(self) -> list[str]:
        id2label = self.loaded.config.get("id2label") or {}
        n = int(self.loaded.config.get("num_labels") or len(id2label) or 2)
        return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]

    @property
    def width(self) -> int:
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        return self.loaded.config.get("problem_type") == "multi_label_classification"

    def forward(self, pieces: Sequence[Piece]) -> np.ndarray:
        import torch

        feats = self.collate(pieces)
        with torch.inference_mode():
            logits = self.model(**feats).logits  # (batch, num_labels)
        return logits.float().cpu().numpy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float64)
        if self.multi_label:
            return 1.0 / (1.0 + np.exp(-logits))
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)

    def postprocess(self, rows: np.ndarray, **options: Any) -> list[Any]:
        """One result per text: the top label and score, or the ``top_k`` best.

        ``top_k=1`` (default) gives ``{"label", "score"}``; ``top_k=N`` or ``None`` (all)
        gives a list of such dicts, best first. ``raw_scores=True``: logits instead of
        probabilities.
        """
        top_k = options.get("top_k", 1)
        probs = rows if options.get("raw_scores") else self.probabilities(rows)
        labels = self.labels
        out: list[Any] = []
        for p in probs:
            order = np.argsort(-p, kind="stable")
            ranked = [{"label": labels[j], "score": float(p[j])} for j in order]
            out.append(ranked[0] if top_k == 1 else ranked[: top_k or None])
        return out

    def flag(self, outputs: Any, summary: Any, first_index: int = 0) -> Any:
        for i, item in enumerate(outputs):
            for d in item if isinstance(item, list) else [item]:
                d.update(summary.flags(first_index + i))
        return outputs
