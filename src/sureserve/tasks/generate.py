"""Greedy text generation with continuous batching over one left-padded KV cache.

The scheduler (``batching/generation.py``) decides each step who joins and who decodes.
Here, a joining prompt is prefilled on its own, then its KV cache is left-padded and
concatenated to the running batch's; every step decodes one token for all running rows
with an attention mask that hides the padding and position ids counted from the mask
(so a row's positions are what they would be alone); finished rows are dropped at once
and fully-padded leading columns trimmed.

Status: the engine core for issue 5 (greedy decoding, eos / max_new_tokens). Sampling,
stop strings, streaming and the HTTP routes are not built yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sureserve.batching.generation import GenerationScheduler
from sureserve.loading.loader import Loaded


@dataclass
class _Row:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # generated so far
    length: int = 0  # real tokens in the cache for this row (prompt + generated - 1)


class Generator:
    def __init__(self, loaded: Loaded, kv_budget_tokens: int = 65_536,
                 max_running: int = 32) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.device = loaded.plan.device
        self.kv_budget_tokens = kv_budget_tokens
        self.max_running = max_running
        self.context = int(loaded.limit.value)

    def generate_ids(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids, prompt excluded) of every prompt, in order."""
        import torch

        sched = GenerationScheduler(self.kv_budget_tokens, self.context, self.max_running)
        for i, p in enumerate(prompts):
            sched.add(i, len(p), max_new_tokens)
        eos = self.tok.eos_token_id
        out: dict[int, list[int]] = {}
        rows: list[_Row] = []
        cache: Any = None
        mask: Any = None  # (rows, cache_len) 1 for real tokens
        with torch.inference_mode():
            while sched.waiting or sched.running:
                plan = sched.plan()
                produced: list[int] = []
                if rows:  # decode one token for every running row
                    last = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
                    mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype,
                                                       device=self.device)], dim=1)
                    pos = torch.tensor([[r.length] for r in rows], device=self.device)
                    logits = self.model(input_ids=last, attention_mask=mask, position_ids=pos,
                                        cache=cache, use_cache=True).logits[:, -1]
                    for r, t in zip(rows, logits.argmax(-1).tolist(), strict=True):
                        r.length += 1
                        r.tokens.append(int(t))
                        produced.append(r.seq_id)
                for seq_id in plan.prefill:  # join: prefill alone, then merge caches
                    ids = torch.tensor([prompts[seq_id]], device=self.device)
                    res = self.model(input_ids=ids, use_cache=True)
                    row = _Row(seq_id, [int(res.logits[0, -1].argmax())], len(prompts[seq_id]))
                    cache, mask = _merge(cache, mask, res.past_key_values, len(prompts[seq_id]),
                                         self.device)
                    rows.append(row)
                    produced.append(seq_id)
                finished = [r.seq_id for r in rows
                            if r.tokens[-1] == eos or len(r.tokens) >= max_new_tokens]
                sched.update(produced, finished)
                if finished:
                    keep = [k for k, r in enumerate(rows) if r.seq_id not in finished]
                    for r in rows:
                        if r.seq_id in finished:
                            out[r.seq_id] = r.tokens
                    rows = [rows[k] for k in keep]
                    if rows:
                        idx = torch.tensor(keep, device=self.device)
                        cache.batch_select_indices(idx)
                        mask = mask[idx]
                        cache, mask = _trim(cache, mask)
                    else:
                        cache, mask = None, None
        return [out[i] for i in range(len(prompts))]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64) -> list[str]:
        ids = [list(self.tok(p)["input_ids"]) for p in prompts]
        outs = self.generate_ids(ids, max_new_tokens)
        return [self.tok.decode(o, skip_special_tokens=True) for o in outs]


def _merge(cache: Any, mask: Any, new: Any, new_len: int, device: str) -> tuple[Any, Any]:
    """Left-pad the running cache or the new one to a common length and stack the rows."""
    import torch
    from transformers import DynamicCache

    if cache is None:
        return new, torch.ones((1, new_len), dtype=torch.long, device=device)
    old_len = mask.shape[1]
    width = max(old_len, new_len)
    merged = DynamicCache()
    for i, (a, b) in enumerate(zip(cache.layers, new.layers, strict=True)):
        k = torch.cat([_left_pad(a.keys, width), _left_pad(b.keys, width)], dim=0)
        v = torch.cat([_left_pad(a.values, width), _left_pad(b.values, width)], dim=0)
        merged.update(k, v, i)
    new_mask = torch.ones((1, new_len), dtype=mask.dtype, device=device)
    mask = torch.cat([_left_pad(mask, width, dim=1), _left_pad(new_mask, width, dim=1)], dim=0)
    return merged, mask


def _left_pad(x: Any, width: int, dim: int = 2) -> Any:
    import torch

    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim=dim)


def _trim(cache: Any, mask: Any) -> tuple[Any, Any]:
    """Drop leading columns that are padding in every row (left after rows finished)."""
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if len(real) else 0
    if start == 0:
        return cache, mask
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
    return cache, mask[:, start:]
