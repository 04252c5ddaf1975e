"""Sentence embeddings, pooled as the model's sentence-transformers config says."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from sureserve.batching.packing import Layout, pack_rows
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
    def width(self) -> int:
        return self.loaded.hidden_size

    def forward(self, pieces: Sequence[Piece]) -> np.ndarray:
        import torch

        feats = self.collate(pieces)
        with torch.inference_mode():
            hidden = self.model(**feats).last_hidden_state  # (batch, seq, hidden)
            pooled = pool(hidden, feats["attention_mask"], self.pooling)  # (batch, hidden)
        return pooled.float().cpu().numpy()

    def token_states(self, pieces: Sequence[Piece], batch: int = 16) -> list[np.ndarray]:
        """Every token's last hidden state per piece, padding dropped (TEI's
        ``/embed_all``); batches of ``batch`` pieces."""
        import torch

        out: list[np.ndarray] = []
        for start in range(0, len(pieces), batch):
            part = pieces[start:start + batch]
            feats = self.collate(part)
            with torch.inference_mode():
                hidden = self.model(**feats).last_hidden_state.float().cpu().numpy()
            out.extend(hidden[i, :len(p.ids)] for i, p in enumerate(part))
        return out

    # --- packed batches (the server's path for short texts; see batching/packing.py) ------

    def packing_unsupported(self) -> str | None:
        """Why this model cannot run packed rows, or None when it may be tried."""
        import inspect

        impl = self.loaded.plan.attn_implementation
        if getattr(self.model.config, "is_decoder", False):
            return "the model is a decoder"
        if impl not in ("sdpa", "eager"):
            return f"the {impl} attention kernel takes no block mask"
        if "position_ids" not in inspect.signature(self.model.forward).parameters:
            return "the model's forward takes no position_ids"
        return None

    def forward_packed(self, pieces: Sequence[Piece], layout: Layout | None = None
                       ) -> np.ndarray:
        """Like ``forward``, with the texts laid end to end in rows (``pack_rows``).

        Each text keeps its own position ids (restarted at its offset, shifted as
        RoBERTa-family embeddings expect) and a block mask lets its tokens attend only to
        each other, so its output matches the padded pass to float rounding; the server
        checks that on probe texts before it packs (``check_packing``)."""
        import torch

        layout = layout or pack_rows([len(p.ids) for p in pieces])
        device = self.loaded.plan.device
        dtype = self.model.dtype
        rows, width = len(layout.rows), layout.width
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((rows, width), dtype=torch.long)
        seg = torch.full((rows, width), -1, dtype=torch.long)  # which text owns each slot
        first = torch.empty(len(pieces), dtype=torch.long)  # flat index of each text's start
        shift = self._position_shift()
        for r, row in enumerate(layout.rows):
            for item, offset in row:
                n = len(pieces[item].ids)
                ids[r, offset:offset + n] = torch.tensor(pieces[item].ids, dtype=torch.long)
                pos[r, offset:offset + n] = torch.arange(shift, shift + n)
                seg[r, offset:offset + n] = item
                first[item] = r * width + offset
        same = seg.unsqueeze(2) == seg.unsqueeze(1)
        # empty slots attend to themselves only, so that no softmax row is all masked
        same &= (seg >= 0).unsqueeze(2) | torch.eye(width, dtype=torch.bool)
        mask = torch.zeros((rows, 1, width, width), dtype=dtype).masked_fill(
            ~same.unsqueeze(1), torch.finfo(dtype).min)
        lengths = torch.tensor([len(p.ids) for p in pieces], dtype=torch.long)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=pos.to(device)).last_hidden_state
            pooled = pool_packed(hidden.reshape(rows * width, -1), seg.reshape(-1).to(device),
                                 first.to(device), lengths.to(device), self.pooling)
        return pooled.float().cpu().numpy()

    def check_packing(self, pieces: Sequence[Piece]) -> float:
        """Largest difference between packed and padded outputs on ``pieces``."""
        padded = np.vstack([self.forward([p]) for p in pieces])
        return float(np.abs(self.forward_packed(pieces) - padded).max())

    def _position_shift(self) -> int:
        # RoBERTa-family embeddings number positions from padding_idx + 1
        pad = getattr(getattr(self.model, "embeddings", None), "padding_idx", None)
        return pad + 1 if isinstance(pad, int) else 0

    def postprocess(self, rows: np.ndarray, **options: Any) -> np.ndarray:
        """Normalize to unit length when asked (default: as the model's config says);
        ``dimensions`` shortens (renormalised when normalized) and ``precision`` quantizes
        the vectors, each only where declared or measured (``vectors.py``)."""
        normalize = options.get("normalize")
        if normalize is None:
            normalize = self.normalize_default
        if normalize:
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows / np.maximum(norms, 1e-12)
        rows = rows.astype(np.float32)
        dims, precision = options.get("dimensions"), options.get("precision")
        if dims is None and precision in (None, "float32"):
            return rows
        return self.vector_forms.apply(rows, dims, precision, renormalize=bool(normalize))

    @functools.cached_property
    def vector_forms(self) -> Any:
        """The shorter sizes and precisions this model may serve (``vectors.allowed``)."""
        from sureserve.vectors import allowed

        return allowed(self.loaded.source.path, self.loaded.config, self.width)


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


def pool_packed(flat: Any, seg: Any, first: Any, lengths: Any, mode: str) -> Any:
    """``pool`` for packed rows. flat: (slots, dim) token states; seg: (slots,) the text
    owning each slot (-1: empty); first, lengths: (texts,) each text's first slot and size."""
    import torch

    texts, dim = first.shape[0], flat.shape[1]
    if mode == "cls":
        return flat[first]
    if mode == "lasttoken":
        return flat[first + lengths - 1]
    keep = seg >= 0
    owner, states = seg[keep], flat[keep]
    if mode == "max":
        out = torch.full((texts, dim), torch.finfo(flat.dtype).min, dtype=flat.dtype,
                         device=flat.device)
        return out.scatter_reduce(0, owner.unsqueeze(1).expand(-1, dim), states, "amax")
    summed = torch.zeros((texts, dim), dtype=flat.dtype, device=flat.device)
    summed.index_add_(0, owner, states)
    return summed / lengths.clamp(min=1).unsqueeze(1).to(flat.dtype)
