"""The drift watch's measures: pure functions over counts and vectors (numpy, no torch).

Each measure compares what a window of recent traffic looked like with a baseline (a
reference file, the first window of traffic, or the gate's probe texts). Thresholds live in
``Settings`` (``drift_*``) and were chosen from the measurements in BENCHMARKS.md
("Drift watch").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: token-length bins for the length distribution: [1, 8), [8, 16), ..., [1024, inf)
LENGTH_EDGES = (8, 16, 32, 64, 128, 256, 512, 1024)
#: a completion "loops" when its tail is one block of at most this many tokens, repeated
LOOP_MAX_BLOCK = 12
LOOP_MIN_REPEATS = 3
LOOP_MIN_TOKENS = 16


def length_bin(tokens: int) -> int:
    """The bin of ``LENGTH_EDGES`` a text of ``tokens`` tokens falls in."""
    return int(np.searchsorted(LENGTH_EDGES, tokens, side="right"))


def _smoothed(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Shares with half a count added to every bin, so that a bin empty on one side gives a
    large but finite divergence (the usual fix for PSI's log of zero)."""
    c = np.asarray(counts, dtype=np.float64) + 0.5
    return c / c.sum()


def psi(baseline: Sequence[float] | np.ndarray, window: Sequence[float] | np.ndarray) -> float:
    """Population stability index between two histograms over the same bins.

    The credit-scoring convention reads it as: < 0.1 no shift, 0.1-0.25 some, > 0.25 a
    significant shift."""
    p, q = _smoothed(baseline), _smoothed(window)
    return float(np.sum((q - p) * np.log(q / p)))


def js_divergence(baseline: Sequence[float] | np.ndarray,
                  window: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence in bits, between 0 (same mix) and 1 (no overlap).

    Symmetric and finite even when a label never occurs on one side, unlike KL; counts
    are not smoothed, so an unseen label counts in full."""
    p = np.asarray(baseline, dtype=np.float64)
    q = np.asarray(window, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, (kl(p) + kl(q)) / 2)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def mean_pairwise_cosine(unit_sum: np.ndarray, n: int) -> float:
    """Mean cosine over all pairs of ``n`` unit vectors, from their sum alone:
    |sum|^2 = n + sum over ordered pairs i != j of cos(i, j). O(dim), not O(n^2 dim)."""
    if n < 2:
        return 0.0
    s = float(unit_sum @ unit_sum)
    return (s - n) / (n * (n - 1))


def collapse_score(window_cos: float, baseline_cos: float) -> float:
    """How much of the distance from the baseline's mean pairwise cosine to 1 (identical
    outputs) the window has closed: 0 = as varied as the baseline, 1 = all identical.
    Normalised this way, one threshold fits models whose ordinary outputs are already
    close together (anisotropic embeddings) and models whose outputs are not."""
    room = max(1.0 - baseline_cos, 1e-6)
    return max(0.0, (window_cos - baseline_cos) / room)


def mean_shift(window_sum: np.ndarray, baseline_sum: np.ndarray) -> float:
    """1 - cosine between the window's mean vector and the baseline's (0: same direction)."""
    a, b = np.asarray(window_sum, np.float64), np.asarray(baseline_sum, np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(1.0 - (a @ b) / (na * nb))


def ends_in_loop(tokens: Sequence[int]) -> bool:
    """Whether a completion ends in a short block of tokens repeated: at least
    ``LOOP_MIN_REPEATS`` times, covering at least ``LOOP_MIN_TOKENS`` tokens, with a block
    of at most ``LOOP_MAX_BLOCK`` tokens (what small models do when they get stuck:
    "the the the", "1. 1. 1.", a sentence over and over)."""
    n = len(tokens)
    if n < LOOP_MIN_TOKENS:
        return False
    for block in range(1, LOOP_MAX_BLOCK + 1):
        need = max(LOOP_MIN_TOKENS, LOOP_MIN_REPEATS * block)
        if need > n:
            break
        seg = list(tokens[-need:])
        if all(seg[k] == seg[k - block] for k in range(block, need)):
            return True
    return False
