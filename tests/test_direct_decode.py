"""The direct decode step (generation/direct.py) against the model's own forward: the same
logits bit for bit and the same keys/values written, padded and unpadded batches, fp32 and
bf16, grouped and plain multi-head attention, each supported architecture; models it cannot
vouch for keep their forward, with the reason."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.cache_utils import DynamicCache

from sureserve.generation.direct import DirectDecode, plan, why_not
from sureserve.generation.kvcache import PaddedKV

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=128)


def _model(kind: str, kv_heads: int = 2, dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    if kind == "llama":
        cfg: Any = LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=kv_heads)
        cls: Any = LlamaForCausalLM
    elif kind == "mistral":
        cfg = MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=kv_heads,
                            sliding_window=None)
        cls = MistralForCausalLM
    else:
        cfg = Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=kv_heads)
        cls = Qwen2ForCausalLM
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).eval().to(dtype)
    if kind == "qwen2":  # random biases, so that a dropped bias shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


def _filled(model: Any, lengths: list[int]) -> tuple[PaddedKV, list[list[int]]]:
    """A padded cache holding one prefilled row per length (random prompts)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = PaddedKV(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim,
                  model.dtype, "cpu", max_rows=8)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in lengths]
    for ids in prompts:
        cache = DynamicCache(config=cfg)
        model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
        kv.add_row([lyr.keys for lyr in cache.layers], [lyr.values for lyr in cache.layers])
    return kv, prompts


def _both(model: Any, lengths: list[int], script: bool = True,
          step: DirectDecode | None = None) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    """One decode step through the forward and through the direct step (its layers in
    TorchScript or in the Python loop; or ``step``, one made beforehand), from the same
    cache state: (logits, logits, written keys, written keys)."""
    torch.manual_seed(1)
    kv, _ = _filled(model, lengths)
    kv.reserve(1)
    rows, width = kv.n, kv.width + 1
    ids = torch.randint(0, model.config.vocab_size, (rows, 1))
    lens = torch.tensor([n + 1 for n in lengths])
    mask = (torch.arange(width)[None, :] >= (width - lens)[:, None]).long()
    pos = (lens - 1)[:, None]
    saved_k, saved_v = kv.k.clone(), kv.v.clone()
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=kv.cache,
                    use_cache=True).logits[:, -1]
        ref_k = kv.k[:, :rows, :, kv.end].clone()
        kv.k.copy_(saved_k)
        kv.v.copy_(saved_v)
        padded = None if all(n + 1 == width for n in lengths) else mask.bool()
        if step is None:
            step = DirectDecode(model, script)
            assert ("TorchScript," in step.describe()) == (script and step.script is not None)
        got = step.step(ids, pos, kv, padded)
        got_k = kv.k[:, :rows, :, kv.end].clone()
    return ref, got, ref_k, got_k


@pytest.mark.parametrize("script", [True, False], ids=["torchscript", "python"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("lengths", [[5, 9, 3], [7, 7]], ids=["padded", "unpadded"])
def test_logits_and_cache_are_bit_identical_to_the_forward(kind: str, lengths: list[int],
                                                           script: bool) -> None:
    model = _model(kind)
    assert why_not(model) is None
    assert (DirectDecode(model, script).script is not None) == script  # torch 2.13 scripts it
    ref, got, ref_k, got_k = _both(model, lengths, script)
    assert torch.equal(ref, got)
    assert torch.equal(ref_k, got_k)


@pytest.mark.parametrize("script", [True, False], ids=["torchscript", "python"])
@pytest.mark.parametrize("lengths", [[5, 9, 3], [6]], ids=["padded", "one-row"])
def test_plain_multi_head_attention_and_bf16_are_bit_identical(lengths: list[int],
                                                               script: bool) -> None:
    ref, got, _, _ = _both(_model("llama", kv_heads=4), lengths, script)
    assert torch.equal(ref, got)
    ref, got, _, _ = _both(_model("llama", dtype=torch.bfloat16), lengths, script)
    assert got.dtype == torch.bfloat16 and torch.equal(ref, got)


def test_a_swapped_linear_layer_is_used_at_the_next_step() -> None:
    """``sureserve quantize``'s search swaps layers of a live engine's model: the direct
    step must not keep the ones it saw first."""
    from sureserve.loading.kernels import Int8WeightOnlyLinear

    model = _model("llama")
    step = DirectDecode(model)
    assert "TorchScript," in step.describe()
    layer = model.model.layers[1].mlp
    layer.down_proj = Int8WeightOnlyLinear(layer.down_proj)
    # a quantized layer runs as a module: the layers fall back to the Python loop
    assert "Python loop: a linear layer is not a plain nn.Linear" in step.describe()
    ref, got, _, _ = _both(model, [4, 6], step=step)
    assert torch.equal(ref, got)


def test_models_it_cannot_vouch_for_keep_their_forward() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert "architecture 'gpt2'" in plan(gpt2).describe()
    eager = _model("llama")
    eager.config._attn_implementation = "eager"
    assert "attention implementation 'eager'" in (why_not(eager) or "")
    hooked = _model("llama")
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "forward hooks" in (why_not(hooked) or "")
    sliding = _model("mistral")
    sliding.config.sliding_window = 16
    assert why_not(sliding) == "sliding-window attention"
    assert "Python loop: decode_script is off" in plan(_model("llama"), script=False).describe()
    off = plan(_model("llama"), enabled=False)
    assert off.direct is None and off.describe() == \
        "decode step through the model's forward: direct_decode is off"


def test_without_torchscript_the_layers_run_the_python_loop(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A torch that cannot script the layer loop (or has no TorchScript) decodes the same,
    through the Python loop, and says so."""
    from sureserve.generation import direct

    def refuse(fn: Any) -> Any:
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(direct, "_SCRIPT", [])
    monkeypatch.setattr(torch.jit, "script", refuse)
    step = DirectDecode(_model("llama"))
    assert step.script is None
    assert "Python loop: TorchScript unavailable (RuntimeError)" in step.describe()
    ref, got, _, _ = _both(_model("llama"), [5, 9, 3], script=True)
    assert torch.equal(ref, got)
