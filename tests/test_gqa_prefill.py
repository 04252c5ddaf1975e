"""Masked prefills of grouped-query models read the key/value heads in place
(generation/attention.py): the same logits bit for bit as ``transformers``' sdpa, padded
and unpadded, fp32 and bf16, and through a stored prefix; only grouped-query models on a
CPU switch, and the direct decode step still vouches for them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.cache_utils import Cache, DynamicLayer

from sureserve.generation import attention
from sureserve.generation.direct import why_not
from tests.test_direct_decode import _model


def _batch(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1  # left padding, as the engine pads a group
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[9, 4, 7], [6, 6]], ids=["padded", "unpadded"])
def test_logits_are_bit_identical_to_sdpa(lengths: list[int], dtype: torch.dtype) -> None:
    model = _model("llama", kv_heads=2, dtype=dtype)
    torch.manual_seed(3)
    ids, mask = _batch(model.config.vocab_size, lengths)
    prefix = torch.randint(0, model.config.vocab_size, (1, 11))
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits
        # a shared stored prefix before the rows, as a group of prompts that reuse it runs
        past = model(input_ids=prefix, use_cache=True).past_key_values

        def after_prefix() -> Any:
            layers: list[Any] = [DynamicLayer() for _ in past.layers]
            for layer, old in zip(layers, past.layers, strict=True):
                layer.update(old.keys.expand(len(lengths), -1, -1, -1),
                             old.values.expand(len(lengths), -1, -1, -1))
            full = torch.cat([torch.ones(len(lengths), 11, dtype=torch.long), mask], dim=1)
            return model(input_ids=ids, attention_mask=full, cache=Cache(layers=layers),
                         use_cache=True).logits

        ref_past = after_prefix()
        assert attention.apply(model, "cpu")
        assert model.config._attn_implementation == attention.NAME
        got = model(input_ids=ids, attention_mask=mask).logits
        got_past = after_prefix()
    assert torch.equal(ref, got)
    assert torch.equal(ref_past, got_past)
    assert why_not(model) is None  # the direct decode step still reproduces it


def test_only_grouped_query_models_on_a_cpu_switch() -> None:
    assert not attention.apply(_model("llama", kv_heads=4), "cpu")  # plain multi-head
    assert not attention.apply(_model("llama"), "cuda")
    eager = _model("llama")
    eager.config._attn_implementation = "eager"
    assert not attention.apply(eager, "cpu")
    assert attention.is_sdpa("sdpa") and attention.is_sdpa(attention.NAME)
    assert not attention.is_sdpa("eager")

