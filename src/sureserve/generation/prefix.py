"""Prefix reuse: keys and values of prompt prefixes already computed, kept for the next.

Many requests start with the same tokens (a shared system prompt, the earlier turns of a
chat). Their keys and values depend only on those tokens and positions, so a prompt that
starts with a stored prefix prefills only the rest (vLLM's automatic prefix caching and
llama.cpp's prompt cache do the same). The store is a chain of blocks of ``block`` tokens:

- a block is keyed by ``(parent block id, its own tokens)``, so a match is exact, token
  for token, never a hash that could collide (a wrong prefix would be a silently wrong
  answer);
- a block holds its tokens' keys and values for every layer, once, however many prompts
  share it (a 400-token system prompt in 32 requests is stored once);
- the store is bounded by ``budget_bytes``; the least recently used block goes first, and
  a lookup refreshes a chain from its last block to its first, so a chain is cut from its
  tail (an orphan that lost its parent is never reached again and ages out);
- only whole blocks are stored, and a lookup leaves at least one prompt token to compute
  (the first generated token needs the last position's logits).

Counters (``hits``, ``misses``, ``tokens_reused``, ``evictions``, ``bytes``) feed
``/metrics``. Not thread-safe: the engine's stepping thread is its only user.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Key = tuple[int, tuple[int, ...]]


@dataclass
class _Block:
    id: int
    key: Key
    k: torch.Tensor  # (layers, heads, block, head_dim)
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 16) -> None:
        if block < 1:
            raise ValueError("block must be at least 1 token")
        self.budget_bytes, self.block = budget_bytes, block
        self._blocks: OrderedDict[Key, _Block] = OrderedDict()  # LRU first
        self._ids = itertools.count(1)  # 0 is the root's id
        self.bytes = 0
        self.hits = self.misses = self.tokens_reused = self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, prompt: Sequence[int], limit: int) -> list[_Block]:
        """The stored blocks that begin ``prompt``, covering at most ``limit`` tokens."""
        chain: list[_Block] = []
        parent, b = 0, self.block
        for start in range(0, limit - b + 1, b):
            got = self._blocks.get((parent, tuple(prompt[start:start + b])))
            if got is None:
                break
            chain.append(got)
            parent = got.id
        return chain

    def record(self, reused: int) -> None:
        """Count one prompt's outcome: ``reused`` tokens from the store (0: a miss)."""
        if reused:
            self.hits += 1
            self.tokens_reused += reused
        else:
            self.misses += 1

    def _longest(self, prompt: Sequence[int]) -> list[_Block]:
        """The longest stored chain that begins ``prompt`` and leaves at least one of its
        tokens to compute (the first generated token needs the last position's logits)."""
        return self._chain(prompt, len(prompt) - 1) if self.budget_bytes > 0 else []

    def match(self, prompt: Sequence[int]) -> tuple[int, int] | None:
        """``lookup``'s (length, id of the last block) without its tensors (nothing is
        copied or counted, the chain is not refreshed): the engine asks this for every
        waiting prompt before each prefill, and builds a prefix's tensors once for all the
        prompts that share it."""
        chain = self._longest(prompt)
        return (len(chain) * self.block, chain[-1].id) if chain else None

    def lookup(self, prompt: Sequence[int], count: bool = True
               ) -> tuple[int, torch.Tensor, torch.Tensor, int] | None:
        """The longest stored prefix of ``prompt`` that leaves at least one token to
        compute: (its length, keys, values, the id of its last block), keys and values
        ``(layers, heads, length, head_dim)``; two prompts given the same id got the same
        prefix. None when nothing is stored for it. Counts a hit or a miss unless
        ``count`` is false (the caller then ``record``s the outcome it acted on)."""
        chain = self._longest(prompt)
        if not chain:
            if count:
                self.record(0)
            return None
        for blk in reversed(chain):  # most recent = the chain's first block
            self._blocks.move_to_end(blk.key)
        length = len(chain) * self.block
        if count:
            self.record(length)
        return (length, torch.cat([c.k for c in chain], dim=2),
                torch.cat([c.v for c in chain], dim=2), chain[-1].id)

    def store(self, prompt: Sequence[int], keys: Sequence[torch.Tensor],
              values: Sequence[torch.Tensor]) -> int:
        """Keep the whole blocks of a prefilled prompt (per layer ``(1, heads, length,
        head_dim)``, ``length >= len(prompt)`` not required: only the prompt's own
        positions are read). Blocks already stored are refreshed, not copied again.
        Returns the tokens now stored for this prompt."""
        if self.budget_bytes <= 0:
            return 0
        b = self.block
        whole = min(len(prompt), keys[0].shape[2]) // b * b
        chain = self._chain(prompt, whole)
        parent = chain[-1].id if chain else 0
        new: list[_Block] = []
        for start in range(len(chain) * b, whole, b):
            k = torch.stack([layer[0, :, start:start + b] for layer in keys]).clone()
            v = torch.stack([layer[0, :, start:start + b] for layer in values]).clone()
            blk = _Block(next(self._ids), (parent, tuple(prompt[start:start + b])), k, v)
            if blk.nbytes > self.budget_bytes:
                break
            new.append(blk)
            parent = blk.id
        for blk in reversed([*chain, *new]):
            if blk.key not in self._blocks:
                self._blocks[blk.key] = blk
                self.bytes += blk.nbytes
            self._blocks.move_to_end(blk.key)
        self._evict(self.budget_bytes)
        return (len(chain) + len(new)) * b

    def _evict(self, budget: int) -> None:
        while self.bytes > budget and self._blocks:
            _, blk = self._blocks.popitem(last=False)
            self.bytes -= blk.nbytes
            self.evictions += 1

    def shrink(self, budget_bytes: int) -> int:
        """Free blocks until at most ``budget_bytes`` stay (memory pressure); returns the
        bytes freed."""
        before = self.bytes
        self._evict(max(budget_bytes, 0))
        return before - self.bytes

    def clear(self) -> None:
        self.shrink(0)
