"""Sequence packing: the pure layout, the packed planner, and packed forward passes that
match padded ones (tiny random BERT here; minilm in tests/e2e)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sureserve.batching.packing import pack_rows
from sureserve.batching.planner import PassCost, partition
from sureserve.tasks.embed import pool, pool_packed

lengths_st = st.lists(st.integers(1, 300), max_size=80)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, extra=st.integers(0, 100))
def test_layout_places_every_text_once_without_overlap(lengths: list[int], extra: int) -> None:
    width = (max(lengths) if lengths else 1) + extra
    layout = pack_rows(lengths, width)
    assert layout.width == width
    placed = sorted(item for row in layout.rows for item, _ in row)
    assert placed == list(range(len(lengths)))
    for row in layout.rows:
        spans = sorted((off, off + lengths[item]) for item, off in row)
        assert spans[0][0] >= 0 and spans[-1][1] <= width
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    # first fit: no two rows could have been merged (one of them would be at most half full)
    fills = sorted(sum(lengths[i] for i, _ in row) for row in layout.rows)
    assert len(fills) < 2 or fills[0] + fills[1] > width
    # never computes more than padding every text to the width would
    assert layout.computed <= max(len(lengths), 1) * width


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, budget=st.integers(1, 5000), size=st.integers(1, 64))
def test_packed_partition_invariants(lengths: list[int], budget: int, size: int) -> None:
    batches = partition(enumerate(lengths), budget, size, PassCost(), packed=True)
    assert sorted(i for b in batches for i in b.ids) == list(range(len(lengths)))
    for b in batches:
        assert b.packed and len(b.ids) <= size
        assert b.cost <= budget or len(b.ids) == 1
        assert b.cost <= b.max_len * len(b.ids)  # packing never plans more than padding


def test_packing_merges_what_padding_keeps_apart() -> None:
    lengths = [60] + [10] * 30
    padded = partition(enumerate(lengths), 4096, 128, PassCost(overhead=60, attention=0.003))
    packed = partition(enumerate(lengths), 4096, 128, PassCost(overhead=60, attention=0.003),
                       packed=True)
    assert len(padded) == 2 and len(packed) == 1
    assert packed[0].cost == 360  # 360 real tokens in 6 rows of 60


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken"])
def test_pool_packed_equals_pool(mode: str) -> None:
    torch.manual_seed(0)
    lengths = [5, 3, 7, 1, 4]
    layout = pack_rows(lengths)
    hidden = torch.randn(len(lengths), max(lengths), 8)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    flat = torch.zeros(len(layout.rows) * layout.width, 8)
    seg = torch.full((flat.shape[0],), -1, dtype=torch.long)
    first = torch.empty(len(lengths), dtype=torch.long)
    for r, row in enumerate(layout.rows):
        for item, off in row:
            start = r * layout.width + off
            flat[start:start + lengths[item]] = hidden[item, :lengths[item]]
            seg[start:start + lengths[item]] = item
            first[item] = start
    got = pool_packed(flat, seg, first, torch.tensor(lengths), mode)
    torch.testing.assert_close(got, pool(hidden, mask, mode))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_matches_padded(tiny_bert: Path, attn: str) -> None:
    import sureserve

    engine = sureserve.load(str(tiny_bert), attn_implementation=attn,
                            accept_gate_failure=True)
    task = engine.task
    assert task.packing_unsupported() is None
    texts = ["a short one", "a somewhat longer sentence about the weather today",
             "x", "the quick brown fox jumps over the lazy dog " * 3, "hello there"]
    pieces = task.to_pieces(texts, "truncate").pieces
    padded = np.vstack([task.forward([p]) for p in pieces])
    packed = task.forward_packed(pieces)
    assert len(pack_rows([len(p.ids) for p in pieces]).rows) < len(pieces)  # really packed
    np.testing.assert_allclose(packed, padded, atol=1e-5)
    assert task.check_packing(pieces) < 1e-5


def test_packing_refused_for_a_kernel_without_block_masks(tiny_bert: Path) -> None:
    import sureserve

    engine = sureserve.load(str(tiny_bert), accept_gate_failure=True)
    object.__setattr__(engine.loaded.plan, "attn_implementation", "flash_attention_2")
    assert "flash_attention_2" in (engine.task.packing_unsupported() or "")
