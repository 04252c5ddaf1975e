"""Sequence packing: several short texts share one row of a forward pass.

A padded batch computes ``count × longest`` tokens; a packed one lays texts end to end in
rows of a fixed width, restarts the position ids at each text and blocks attention
between texts, so it computes little more than the real tokens. Pure Python: this module
only decides the layout (which texts go in which row, at which offset); the task builds
the tensors from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """``rows[r]`` lists ``(item, offset)`` pairs; every row is ``width`` tokens wide."""

    width: int
    rows: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def computed(self) -> int:
        return self.width * len(self.rows)


def pack_rows(lengths: Sequence[int], width: int | None = None) -> Layout:
    """First-fit decreasing: each text, longest first, goes into the first row with room.

    ``width`` defaults to the longest text, which is never wider than what the padded
    batch would have computed; first-fit decreasing uses at most 11/9 of the optimal
    number of rows plus one. Items are positions in ``lengths``.
    """
    if not lengths:
        return Layout(max(width or 1, 1), ())
    longest = max(lengths)
    width = max(width or longest, longest, 1)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    used: list[int] = []
    rows: list[list[tuple[int, int]]] = []
    for i in order:
        for r, fill in enumerate(used):
            if fill + lengths[i] <= width:
                rows[r].append((i, fill))
                used[r] += lengths[i]
                break
        else:
            rows.append([(i, 0)])
            used.append(lengths[i])
    return Layout(width, tuple(tuple(row) for row in rows))
