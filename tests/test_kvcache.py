"""The in-place left-padded KV store, against a plain per-row reference (random tensors)."""

from __future__ import annotations

import random

import torch

from sureserve.generation.kvcache import PaddedKV

L, H, D = 2, 3, 4


def _check(kv: PaddedKV, rows: list[list[torch.Tensor]]) -> None:
    assert kv.n == len(rows)
    for r, cols in enumerate(rows):
        real = torch.stack(cols, dim=1)  # (H, len, D) for layer-0 keys
        window = kv.k[0, r, :, kv.start:kv.end]
        pad = kv.width - len(cols)
        assert pad >= 0
        assert torch.equal(window[:, pad:], real)
        assert not window[:, :pad].any()  # zeros left of the row's tokens
        assert torch.equal(kv.v[0, r, :, kv.start + pad:kv.end], -real)


def test_rows_join_step_and_leave_like_a_rebuilt_cache() -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    kv = PaddedKV(L, H, D, torch.float32, "cpu", max_rows=6)
    rows: list[list[torch.Tensor]] = []
    for _ in range(300):
        action = rng.random()
        if (action < 0.25 or not rows) and len(rows) < 6:
            n = rng.randint(1, 90)
            k = torch.randn(1, H, n, D)
            if n > 1 and rng.random() < 0.5:  # a reused prefix and a chunk, as pieces
                cut = rng.randint(1, n - 1)
                kv.add_row([(k[:, :, :cut], k[:, :, cut:])] * L,
                           [(-k[:, :, :cut], -k[:, :, cut:])] * L)
            else:
                kv.add_row([k] * L, [-k] * L)
            keys, values = kv.row(kv.n - 1, n)  # views of what was just written
            assert all(torch.equal(t, k) for t in keys)
            assert all(torch.equal(t, -k) for t in values)
            rows.append([k[0, :, j] for j in range(n)])
        elif action < 0.4:
            r = rng.randrange(len(rows))
            kv.remove_row(r)
            rows[r] = rows[-1]
            rows.pop()
            if rows:
                kv.trim(max(len(c) for c in rows))
        else:
            kv.reserve(1)
            new = torch.randn(len(rows), H, 1, D)
            for layer in kv.cache.layers:
                keys, values = layer.update(new, -new)
                assert torch.equal(values, -keys)
                assert keys.shape == (len(rows), H, kv.width + 1, D)
            kv.advance(1)
            for r, cols in enumerate(rows):
                cols.append(new[r, :, 0])
        _check(kv, rows)
        if rows:
            assert kv.cache.get_seq_length() == kv.width
            assert kv.width == max(len(c) for c in rows)  # trimmed to the longest row
    assert kv.allocated_bytes > 0 or not rows
