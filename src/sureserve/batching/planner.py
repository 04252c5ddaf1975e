"""The batch planner: pure Python, no torch, no I/O.

A padded batch costs ``longest × count`` tokens of compute, so the planner sorts pending
work by length and cuts batches that stay under a token budget. Sorting a whole window
makes neighbours in a batch similar in length, which is what keeps padding small; the
window bounds how many texts are held at once.

Two forms:
* ``plan_batches(lengths, ...)`` for offline work over a known list, cut greedily
  (``cut``): windows of thousands of texts sorted together leave little padding to win;
* ``oldest_batch(queue, ...)`` for the server's queue, a few dozen texts of mixed lengths
  where the greedy rule pads short texts to a long one's length: the cheapest split
  (``partition``) under a measured ``PassCost``, the batch holding the oldest text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


def padding_ratio(real: int, computed: int) -> float:
    """Padded tokens computed per real token."""
    return (computed - real) / max(real, 1)


def padding_share(real: int, computed: int) -> float:
    """Share of computed tokens that were padding."""
    return (computed - real) / max(computed, 1)


@dataclass(frozen=True)
class Batch:
    """Items run together in one forward pass, padded to ``max_len`` (or, when ``packed``,
    laid end to end in rows ``max_len`` wide: see ``batching/packing.py``)."""

    ids: tuple[int, ...]
    max_len: int
    real_tokens: int
    packed: bool = False

    @property
    def cost(self) -> int:
        """Tokens the forward pass computes, padding included. For a packed batch, the
        fewest rows that can hold its tokens: the packing itself (first-fit decreasing)
        may need a row or two more, and the server splits a batch whose layout would
        exceed the budget."""
        if self.packed:
            return max(-(-self.real_tokens // self.max_len), 1) * self.max_len
        return self.max_len * len(self.ids)


def cut(
    items: Iterable[tuple[int, int]],
    max_tokens: int,
    max_size: int,
    min_tokens: int = 0,
    max_padding: float = 1.0,
) -> list[Batch]:
    """Cut ``(id, length)`` items into batches, longest first.

    A batch closes when it is full (``max_size`` items or ``max_tokens`` of cost), or when
    it already costs ``min_tokens`` and the next item would push its padding share above
    ``max_padding``. The second rule exists because on a CPU the forward pass is about as
    efficient at ~1-2k tokens as at 8k, so a bigger batch buys nothing once it is that size,
    while padding costs its full price.

    Invariant: every item is in exactly one batch, and a batch's cost is at most
    ``max_tokens`` unless it holds a single item that is longer than the budget on its own
    (it still has to run; the usable-length limit, not the budget, bounds single texts).
    Longest-first puts the most memory-hungry batch at the start, so an out-of-memory
    problem shows at once rather than at the end of a long run.
    """
    ordered = sorted(items, key=lambda it: (-it[1], it[0]))
    batches: list[Batch] = []
    ids: list[int] = []
    longest = 0
    real = 0
    for item_id, length in ordered:
        # lengths descend, so the batch's longest is its first item's length
        if ids and _closes(len(ids), longest, real, length, max_tokens, max_size,
                           min_tokens, max_padding):
            batches.append(Batch(tuple(ids), longest, real))
            ids, real = [], 0
        if not ids:
            longest = max(length, 1)
        ids.append(item_id)
        real += length
    if ids:
        batches.append(Batch(tuple(ids), longest, real))
    return batches


def _closes(n: int, longest: int, real: int, length: int, max_tokens: int, max_size: int,
            min_tokens: int, max_padding: float) -> bool:
    """Whether a batch of ``n`` items must close before taking one of ``length`` tokens."""
    cost = longest * (n + 1)
    if n >= max_size or cost > max_tokens:
        return True
    padding_share = (cost - real - length) / cost
    return longest * n >= min_tokens and padding_share > max_padding


def plan_batches(
    lengths: Sequence[int],
    max_tokens: int,
    max_size: int,
    window: int,
    min_tokens: int = 0,
    max_padding: float = 1.0,
) -> list[Batch]:
    """Batches over ``lengths`` (ids are positions), sorting ``window`` items at a time."""
    if max_tokens < 1 or max_size < 1 or window < 1:
        raise ValueError("max_tokens, max_size and window must be positive")
    out: list[Batch] = []
    for start in range(0, len(lengths), window):
        part = range(start, min(start + window, len(lengths)))
        out.extend(cut(((i, lengths[i]) for i in part), max_tokens, max_size,
                       min_tokens, max_padding))
    return out


@dataclass(frozen=True)
class PassCost:
    """Time of one forward pass of ``n`` texts padded to ``longest`` tokens, in units of
    the time one token spends in the linear layers:

        overhead + n*longest + attention * n*longest**2

    ``overhead`` is the fixed cost of a pass (on a CPU, streaming the weights once: ~130
    tokens' worth for minilm, so one 256-token article padded together with 15 snippets
    costs far more than two passes); ``attention`` is the part that grows with length.
    The server measures both on its own model at warm-up (``fit``); the defaults are
    minilm's on a 2-core CPU.
    """

    overhead: float = 130.0
    attention: float = 1 / 300

    def __call__(self, n: int, longest: int) -> float:
        return self.overhead + n * longest * (1 + self.attention * longest)

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> PassCost:
        """Least squares over ``(n, longest, seconds)`` timings. Falls back to the
        defaults when the timings are too noisy to say anything (a non-positive slope)."""
        if len(samples) < 3:
            return cls()
        a = np.array([[1.0, n * ln, n * ln * ln] for n, ln, _ in samples])
        t = np.array([sec for *_, sec in samples])
        (fixed, per_token, per_ctx), *_ = np.linalg.lstsq(a, t, rcond=None)
        if per_token <= 0:
            return cls()
        return cls(overhead=max(float(fixed / per_token), 0.0),
                   attention=max(float(per_ctx / per_token), 0.0))


def partition(items: Iterable[tuple[int, int]], max_tokens: int, max_size: int,
              cost: PassCost, packed: bool = False) -> list[Batch]:
    """The cheapest split of ``(id, length)`` items into batches, longest first.

    Sorted by length, an optimal split takes contiguous runs (a text never gains from
    sitting with longer texts than its neighbours), so a dynamic programme over the sorted
    items finds it: ``best[j]`` is the cheapest cost of the ``j`` longest items, trying each
    possible last batch. Same invariants as ``cut``: every item once, at most ``max_size``
    per batch, cost at most ``max_tokens`` unless a single text is longer on its own.
    O(n * max_size), vectorised over the last batch's start.

    ``packed``: batches will be packed into rows as wide as their longest text, so a batch
    costs its rows (about its real tokens over the width) rather than count x longest;
    the split then only weighs a pass's fixed cost against the attention width.
    """
    ordered = sorted(items, key=lambda it: (-it[1], it[0]))
    n = len(ordered)
    if n == 0:
        return []
    lengths = np.array([max(length, 1) for _, length in ordered], dtype=np.float64)
    prefix = np.concatenate([[0.0], np.cumsum([length for _, length in ordered])])
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        lo = max(0, j - max_size)
        longest = lengths[lo:j]  # longest of batch [i, j) is its first item
        size = j - np.arange(lo, j)
        rows = np.maximum(np.ceil((prefix[j] - prefix[lo:j]) / longest), 1) if packed \
            else size
        total = best[lo:j] + cost.overhead + rows * longest * (1 + cost.attention * longest)
        total[(size > 1) & (rows * longest > max_tokens)] = np.inf
        k = int(np.argmin(total))
        best[j], start[j] = total[k], lo + k
    batches: list[Batch] = []
    j = n
    while j > 0:
        i = int(start[j])
        run = ordered[i:j]
        batches.append(Batch(tuple(it[0] for it in run), max(run[0][1], 1),
                             sum(it[1] for it in run), packed))
        j = i
    return batches[::-1]


def oldest_batch(queue: Sequence[tuple[int, int]], max_tokens: int, max_size: int,
                 cost: PassCost, packed: bool = False, window: int = 4096) -> Batch | None:
    """The next batch for a server queue: ``(id, length)`` items, oldest first.

    One step is one forward pass, and an embedding or classification item finishes in the
    step that runs it, so the queue itself is the whole state (the caller owns it). The
    oldest ``window`` items are split with ``partition`` and the batch holding the oldest
    one is returned; the rest are re-planned next time with whatever arrived meanwhile, so
    a waiting short text soon finds company of its own length rather than riding, padded,
    with a long one, and nothing waits forever behind newcomers. Serving the oldest first
    keeps the latency tail close to its median (closed-loop simulation: BENCHMARKS.md).
    """
    eligible = list(queue[:window])
    if not eligible:
        return None
    oldest = eligible[0][0]
    return next(b for b in partition(eligible, max_tokens, max_size, cost, packed)
                if oldest in b.ids)
