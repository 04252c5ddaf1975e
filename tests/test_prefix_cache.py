"""The prefix store on its own: exact matches only, whole blocks, one copy of a shared
prefix, least recently used out first (chains cut from the tail), bounded bytes."""

from __future__ import annotations

import torch

from sureserve.generation.prefix import PrefixCache

LAYERS, HEADS, DIM = 2, 3, 4
BLOCK_BYTES = 2 * LAYERS * HEADS * 4 * DIM * 4  # a 4-token block, fp32 keys and values


def kv(prompt: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys/values that encode (layer, position, token), so a wrong slice shows."""
    keys, values = [], []
    for layer in range(LAYERS):
        t = torch.tensor(prompt, dtype=torch.float32)
        pos = torch.arange(len(prompt), dtype=torch.float32)
        k = (t * 1000 + pos * 10 + layer)[None, None, :, None].expand(1, HEADS, -1, DIM)
        keys.append(k.clone())
        values.append(-k.clone())
    return keys, values


def test_a_prompt_finds_the_whole_blocks_of_an_earlier_one_and_leaves_a_token() -> None:
    pc = PrefixCache(budget_bytes=100 * BLOCK_BYTES, block=4)
    first = list(range(10, 20))  # 10 tokens: two whole blocks stored
    assert pc.lookup(first) is None and pc.misses == 1
    assert pc.store(first, *kv(first)) == 8
    assert len(pc) == 2 and pc.bytes == 2 * BLOCK_BYTES
    again = pc.lookup(first)
    assert again is not None
    length, k, v, chain = again
    want_k, want_v = kv(first)
    assert length == 8 and k.shape == (LAYERS, HEADS, 8, DIM)
    for layer in range(LAYERS):
        assert torch.equal(k[layer], want_k[layer][0, :, :8])
        assert torch.equal(v[layer], want_v[layer][0, :, :8])
    # exactly the stored 8 tokens: one more token must be computed, so 8 -> the 4 before
    hit = pc.lookup(first[:8])
    assert hit is not None and hit[0] == 4 and hit[3] != chain
    assert pc.hits == 2 and pc.tokens_reused == 12


def test_one_different_token_in_a_block_is_a_miss_from_there_on() -> None:
    pc = PrefixCache(budget_bytes=100 * BLOCK_BYTES, block=4)
    base = list(range(100, 112))
    pc.store(base, *kv(base))
    changed = base.copy()
    changed[5] = 7  # second block differs
    hit = pc.lookup([*changed, 1])
    assert hit is not None and hit[0] == 4  # only the first block is the same
    changed[0] = 7
    assert pc.lookup([*changed, 1]) is None


def test_a_shared_prefix_is_stored_once() -> None:
    pc = PrefixCache(budget_bytes=100 * BLOCK_BYTES, block=4)
    system = list(range(1, 9))  # 8 tokens: two blocks
    for user in ([50, 51, 52, 53], [60, 61, 62, 63], [70, 71, 72, 73]):
        p = system + user
        hit = pc.lookup(p)
        pc.store(p, *kv(p))
        assert hit is None or hit[0] == 8
    assert len(pc) == 2 + 3 and pc.bytes == 5 * BLOCK_BYTES
    a, b = pc.lookup([*system, 50, 51, 52, 53, 0]), pc.lookup([*system, 99])
    assert a is not None and a[0] == 12
    assert b is not None and b[0] == 8


def test_least_recently_used_goes_first_and_chains_lose_their_tail() -> None:
    pc = PrefixCache(budget_bytes=3 * BLOCK_BYTES, block=4)
    old, new = list(range(1, 9)), list(range(21, 29))
    pc.store(old, *kv(old))
    pc.store(new, *kv(new))  # 4 blocks > 3: old's tail block goes first, its head stays
    assert pc.bytes == 3 * BLOCK_BYTES and pc.evictions == 1
    hit = pc.lookup([*old, 0])
    assert hit is not None and hit[0] == 4
    assert (pc.lookup([*new, 0]) or [0])[0] == 8
    # memory pressure: shrink gives bytes back
    assert pc.shrink(BLOCK_BYTES) == 2 * BLOCK_BYTES and len(pc) == 1
    pc.clear()
    assert pc.bytes == 0 and len(pc) == 0 and pc.lookup([*new, 0]) is None


def test_budget_zero_stores_nothing_and_a_block_larger_than_the_budget_is_skipped() -> None:
    off = PrefixCache(budget_bytes=0, block=4)
    p = list(range(16))
    assert off.store(p, *kv(p)) == 0 and off.lookup(p) is None and off.bytes == 0
    tiny = PrefixCache(budget_bytes=BLOCK_BYTES - 1, block=4)
    assert tiny.store(p, *kv(p)) == 0 and tiny.bytes == 0


def test_keys_longer_than_the_prompt_store_only_the_prompts_positions() -> None:
    pc = PrefixCache(budget_bytes=100 * BLOCK_BYTES, block=4)
    prompt = list(range(6))
    keys, values = kv([*prompt, 99, 98, 97])  # e.g. a cache that ran past the prompt
    assert pc.store(prompt, keys, values) == 4
