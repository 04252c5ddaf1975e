"""SDPA for grouped-query models on a CPU without copying the keys and values per head.

Why: ``transformers``' ``sdpa`` attention runs a padded (masked) prefill of a
grouped-query model (smollm2: 9 query heads over 3 key/value heads) by first repeating
every key/value head for its query heads (``repeat_kv``), because CUDA's fast kernels
refuse a mask with ``enable_gqa``. On a CPU that copy is pure cost: torch's CPU flash
kernel takes ``enable_gqa`` with a mask and gives **the same bits** (the same kernel reads
head ``h // groups`` instead of a copy of it). Measured on smollm2's shapes (17 prompts of
30 tokens after a 446-token stored prefix, 2 threads): 10.6 ms per layer with the copy,
5.3 ms without; it is what a burst of prompts that share a system prompt spends besides
its matmuls (BENCHMARKS.md, "Prefill without repeated heads").

Only that case changes: a CPU tensor, more than one query per row, a mask, grouped heads,
nothing the stock function handles specially (position bias, softcap, attention weights).
Everything else (decode steps, CUDA, unmasked prefills, which ``transformers`` already
runs with ``enable_gqa``) goes to ``transformers``' own function. Tests compare logits with
``torch.equal`` against ``sdpa`` on padded batches.
"""

from __future__ import annotations

from typing import Any

NAME = "sureserve_sdpa"


def sdpa_gqa_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                     dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (getattr(module, "num_key_value_groups", 1) > 1 and query.shape[2] > 1
            and attention_mask is not None and query.device.type == "cpu"
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False)):
        # with a mask the stock function passes is_causal=False: the mask says it all
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=dropout, scale=scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def register() -> None:
    """Make ``NAME`` known to ``transformers`` (the attention and its mask: sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_gqa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def apply(model: Any, device: str) -> bool:
    """Switch ``model`` from ``sdpa`` to ``NAME`` where it gains: a CPU, grouped-query
    heads. Returns whether it switched."""
    cfg = getattr(model, "config", None)
    if cfg is None or device != "cpu" or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if not heads or not kv_heads or heads == kv_heads:
        return False
    register()
    model.set_attn_implementation(NAME)
    return getattr(cfg, "_attn_implementation", None) == NAME


def is_sdpa(name: str | None) -> bool:
    """``sdpa`` or this module's variant of it (the same arithmetic)."""
    return name in ("sdpa", NAME)
