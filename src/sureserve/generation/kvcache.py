"""An in-place, left-padded KV cache for continuous batching.

transformers' ``DynamicCache`` appends each step's keys and values with ``torch.cat``,
copying the whole cache every step (a measurable share of a step: BENCHMARKS.md), and
adding or removing a row means rebuilding it. Here every layer's keys and values live
in one preallocated buffer ``(layers, rows, heads, columns, head_dim)`` with headroom:

- the live span is columns ``[start, end)``; every row's real tokens end at ``end``
  (left padding), and within the span a row is zero left of its tokens (so masked
  positions can never carry NaN or inf into the attention product);
- a step writes its new column in place (``end`` then advances);
- a joining row's prefilled keys/values are copied into the next free row slot, right
  aligned; a leaving row is replaced by the last row (one row copied, not the cache), and
  the caller mirrors that swap in its own row order;
- the buffer is reallocated when rows or columns run out, or when more dead columns
  have piled up left of the span than the span is wide (``start`` moves right for free
  when the longest row leaves); row slots grow by a quarter and are given back once more
  than half again the live rows. A reallocation is expensive beyond its copy: a fresh
  buffer of hundreds of MiB is paid again in page faults as it is first touched. So the
  caller says how many columns the running rows may still need (``ahead``: the largest
  remaining max_new_tokens) and a reallocation makes that room at once, instead of
  ``COLUMN_HEADROOM`` columns at a time; and a group of rows joining together gets its
  room in one reallocation (``make_room``). The allocation stays within 1.5x the live rows
  (at least 4) and two spans plus ``ahead`` plus ``COLUMN_HEADROOM`` columns: the
  rectangle the scheduler reserves, plus bounded headroom.

The model sees a ``transformers.Cache`` whose layers return views of the span.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

COLUMN_HEADROOM = 32  # free columns after a reallocation; also the most dead ones kept

# one layer of a joining row: a tensor, or consecutive pieces of it along the length
Piece = torch.Tensor | Sequence[torch.Tensor]


def pieces(layer: Piece) -> Sequence[torch.Tensor]:
    return (layer,) if isinstance(layer, torch.Tensor) else layer


class _SpanLayer(DynamicLayer):
    """One model layer's view of the store (the model calls ``update`` once per step)."""

    def __init__(self, store: PaddedKV, index: int) -> None:  # no super(): no own tensors
        self.store, self.index = store, index
        self.is_initialized = True
        self.device = store.device

    @property
    def keys(self) -> torch.Tensor:  # type: ignore[override]
        s = self.store
        return s.k[self.index, :s.n, :, s.start:s.end]

    @property
    def values(self) -> torch.Tensor:  # type: ignore[override]
        s = self.store
        return s.v[self.index, :s.n, :, s.start:s.end]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.store
        q = key_states.shape[2]
        s.k[self.index, :s.n, :, s.end:s.end + q] = key_states
        s.v[self.index, :s.n, :, s.end:s.end + q] = value_states
        return (s.k[self.index, :s.n, :, s.start:s.end + q],
                s.v[self.index, :s.n, :, s.start:s.end + q])

    def get_seq_length(self) -> int:
        return self.store.end - self.store.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class PaddedKV:
    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: str | torch.device, max_rows: int) -> None:
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.dtype, self.device, self.max_rows = dtype, torch.device(device), max_rows
        self.n = 0
        self.start = self.end = 0
        self.k = self.v = torch.zeros((layers, 0, heads, 0, head_dim), dtype=dtype,
                                      device=self.device)
        self.cache = Cache(layers=[_SpanLayer(self, i) for i in range(layers)])

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _realloc(self, rows: int, left: int, right: int) -> None:
        """New buffers holding the span at column ``left`` with ``right`` free columns
        after it (and ``rows`` row slots); the live rows are copied over."""
        width = self.width
        # uninitialised: only the live span is ever read, and every column entering it is
        # written first (a joining row zeroes its padding, decode writes whole columns);
        # zero-filling hundreds of MiB here cost more than the prefill it followed
        k = torch.empty((self.layers, rows, self.heads, left + width + right, self.head_dim),
                        dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        if self.n:
            k[:, :self.n, :, left:left + width] = self.k[:, :self.n, :, self.start:self.end]
            v[:, :self.n, :, left:left + width] = self.v[:, :self.n, :, self.start:self.end]
        self.k, self.v = k, v
        self.start, self.end = left, left + width

    def reserve(self, columns: int, ahead: int = 0) -> None:
        """Room for ``columns`` more columns (one decode step: 1); a reallocation, when
        one is needed, makes room for ``ahead`` columns."""
        if self.end + columns > self.k.shape[3] or \
                self.start > max(COLUMN_HEADROOM, self.width):
            rows = self.k.shape[1]
            if self.n + self.n // 2 < rows:  # under-used: give row slots back
                rows = max(4, self.n + self.n // 4)
            self._realloc(rows, 0, max(columns, ahead) + COLUMN_HEADROOM)

    def make_room(self, rows: int, length: int, ahead: int = 0) -> None:
        """Room for ``rows`` more rows of up to ``length`` tokens (and, when it
        reallocates, ``ahead`` columns to decode into), in one reallocation at most (a
        group of prefilled rows joining together would otherwise grow the buffer a quarter
        at a time, copying it each time)."""
        have = self.k.shape[1]
        if self.n == 0:
            self.start = self.end = self.k.shape[3]
        if self.n + rows > have or length > self.end:
            self._realloc(min(self.max_rows, max(self.n + rows, have + have // 4, 4)),
                          max(length - self.width, 0), ahead + COLUMN_HEADROOM)

    def add_row(self, keys: Sequence[Piece], values: Sequence[Piece]) -> None:
        """Append one prefilled row (per layer: (1, heads, length, head_dim)), right-aligned.
        A layer may come as consecutive pieces along the length (a reused prefix and the
        row's own chunk, straight from a group's forward: written in place, never joined
        into a temporary first)."""
        length = sum(t.shape[2] for t in pieces(keys[0]))
        rows = self.k.shape[1]
        if self.n == 0:
            self.start = self.end = self.k.shape[3]  # empty: any alignment will do
        if self.n >= rows or length > self.end:
            self._realloc(min(self.max_rows, max(self.n + 1, rows + rows // 4, 4)),
                          max(length - self.width, 0), COLUMN_HEADROOM)
        new_start = min(self.start, self.end - length)
        if new_start < self.start:  # the span grows left: keep the zero invariant
            self.k[:, :self.n, :, new_start:self.start] = 0
            self.v[:, :self.n, :, new_start:self.start] = 0
        r = self.n
        self.k[:, r, :, new_start:self.end - length] = 0
        self.v[:, r, :, new_start:self.end - length] = 0
        for i, (kk, vv) in enumerate(zip(keys, values, strict=True)):
            for buf, layer in ((self.k, kk), (self.v, vv)):
                col = self.end - length
                for piece in pieces(layer):
                    buf[i, r, :, col:col + piece.shape[2]] = piece[0]
                    col += piece.shape[2]
        self.start = new_start
        self.n += 1

    def row(self, r: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Row ``r``'s last ``length`` columns per layer, as views ``(1, heads, length,
        head_dim)`` (what a row just added holds: its prompt's keys and values)."""
        cols = slice(self.end - length, self.end)
        return ([self.k[i, r:r + 1, :, cols] for i in range(self.layers)],
                [self.v[i, r:r + 1, :, cols] for i in range(self.layers)])

    def remove_row(self, r: int) -> None:
        """Drop row ``r`` by moving the last row into its slot (the caller mirrors it)."""
        last = self.n - 1
        if r != last:
            self.k[:, r, :, self.start:self.end] = self.k[:, last, :, self.start:self.end]
            self.v[:, r, :, self.start:self.end] = self.v[:, last, :, self.start:self.end]
        self.n -= 1
        if self.n == 0:  # idle: give the memory back
            self.k = self.v = self.k[:, :0, :, :0]
            self.start = self.end = 0

    def trim(self, longest: int) -> None:
        """Forget columns left of the longest remaining row."""
        self.start = max(self.start, self.end - longest)

    def advance(self, columns: int = 1) -> None:
        self.end += columns
