"""A decode step for Llama-family models that walks the model's layers directly.

Why: at one running sequence a CPU decode step is weight streaming (211 matmuls per token
for smollm2) plus ~1,000 small operations, and the small ones are mostly not arithmetic but
``nn.Module`` calls, ``transformers``' generic plumbing (output records, kwargs handling,
the attention-interface lookup, a causal mask built and checked every step) and the
``Cache`` object's per-layer ``update``. Measured on smollm2 fp32, one row, 2 threads
(BENCHMARKS.md "Generation: a direct decode step"): the same arithmetic called directly
decodes ~1.2x faster, with bit-identical logits.

Bit-identical is the contract: every operation here is the one ``transformers`` runs, in
the same order and dtype (RMSNorm upcast to float32 and back, rotary cos/sin computed in
float32 from the position ids, SDPA called exactly as ``sdpa_attention_forward`` calls it:
grouped-query heads by ``enable_gqa`` when no row is padded, packed per key/value head with
a boolean padding mask otherwise). The tests compare logits with ``torch.equal`` against the
model's own forward, padded and unpadded, fp32 and bf16, per supported architecture; a
model this module cannot vouch for keeps the model's forward (``plan`` says why).

The layers run in one TorchScript function (``_layers``) when every linear layer of the
decoder is a plain ``nn.Linear``: the same operations, executed by TorchScript's interpreter
instead of Python, which takes ~3 of the ~7 ms a one-row smollm2 token spent outside its
matmuls (BENCHMARKS.md "Generation: the decode layers in TorchScript"). Anything else (a
quantized replacement, a torch without TorchScript) runs the Python loop, which is the
reference the script is tested against, and ``describe`` says which runs.

Only decode steps (one new token per row over the in-place ``PaddedKV``) take this path;
prefill, prompt scoring and everything else call the model as before. Linear layers that
are plain ``nn.Linear`` run as ``F.linear`` (what ``nn.Linear.forward`` does), or as
oneDNN's packed product wherever the layer's ``PackedForward`` (``loading/packed.py``) would
take a step of this many rows (what the forward then runs); quantized replacements
(``loading/kernels.py``) are called as modules, so every precision sureserve serves takes
the same path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sureserve.generation.attention import is_sdpa
from sureserve.loading.packed import packed_forward, tensor_version

log = logging.getLogger("sureserve.generation")

#: architectures whose decoder layer is Llama's (pre-norm RMSNorm, rotary q/k, SDPA, SiLU
#: gated MLP); Qwen2 adds biases to q/k/v, which ``F.linear`` carries
ARCHITECTURES = ("llama", "mistral", "qwen2")
#: rotary variants whose frequencies change with the sequence at run time (their module
#: recomputes ``inv_freq`` in ``forward``); the others are fixed at load and read here
DYNAMIC_ROPE = ("dynamic", "longrope")


def why_not(model: Any) -> str | None:
    """None when ``DirectDecode`` reproduces ``model``'s decode step exactly; else the
    reason it keeps the model's own forward (for ``/info``)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"architecture {kind!r} (direct steps exist for {', '.join(ARCHITECTURES)})"
    attn = getattr(cfg, "_attn_implementation", None)
    if not is_sdpa(attn):
        return f"attention implementation {attn!r} (the direct step reproduces sdpa)"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r}"
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope in DYNAMIC_ROPE:
        return f"rotary type {rope!r} recomputes its frequencies per step"
    if getattr(cfg, "sliding_window", None) is not None and \
            (kind == "mistral" or getattr(cfg, "use_sliding_window", False)):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "layers other than full attention"
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "weights offloaded or dispatched by accelerate hooks"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "forward hooks are registered on the model (a direct step would skip them)"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    return None


def _apply(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with less dispatch: a plain ``nn.Linear`` as the ``F.linear`` its
    forward is; anything else (a quantized replacement) through its own forward. Looked up
    at every step, never cached: ``sureserve quantize``'s search swaps layers in and out
    of a live engine's model."""
    if module.__class__ is _LINEAR:
        packed = packed_forward(module)  # loading/packed.py
        if packed is not None:
            return packed(x)
        p = module._parameters
        return F.linear(x, p["weight"], p["bias"])  # type: ignore[arg-type]
    return module.forward(x)


_LINEAR = torch.nn.Linear


class DirectDecode:
    """One decode step of a Llama-family model over a ``PaddedKV``."""

    def __init__(self, model: Any, script: bool = True, kernel: Any = None,
                 whole: bool = True, packing: Any = None) -> None:
        cfg = model.config
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.rotary = inner.rotary_emb
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        self.scaling = inner.layers[0].self_attn.scaling
        # sureserve's GEMV kernel (native.KernelPlan) for steps of few rows, or None
        self.kernel = kernel if kernel is not None and kernel.kernel is not None \
            and kernel.max_rows > 0 else None
        # steps the kernel takes run as one call of it (``_whole``) unless ``whole`` is off
        # (then its fused calls per layer, in the Python loop: the tests and the
        # benchmark script compare the two)
        self.whole = whole
        # oneDNN packed linears (``loading.packed.PackPlan``): the script and the Python
        # loop call them wherever the forward would (``_lin``, ``_apply``)
        self.packing = packing if packing is not None and packing.min_rows() is not None \
            else None
        # (input norm, attention, post-attention norm, MLP) per layer: their linear
        # children are read at each step (see ``_apply``)
        self.layers = [(layer.input_layernorm, layer.self_attn._modules,
                        layer.post_attention_layernorm, layer.mlp._modules)
                       for layer in inner.layers[:cfg.num_hidden_layers]]
        # where each linear layer hangs (its parent's ``_modules`` and its name), lm_head
        # last: read at each step for the kernel's whole-step call (``_prepared``)
        self._slots = [(parent, name) for _, attn, _, mlp in self.layers
                       for parent, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                             (mlp, ("gate_proj", "up_proj", "down_proj")))
                       for name in names] + [(model._modules, "lm_head")]
        self._prep: _Prepared | None = None
        self._scratch = torch.empty(0)
        eps = {norm.variance_epsilon for layer in self.layers for norm in (layer[0], layer[2])}
        self.eps = eps.pop() if len(eps) == 1 else None
        # the scripted layer loop (None: the Python loop runs, for the reason given)
        self.script: Any = None
        if not script:
            self.why_python = "decode_script is off"
        elif self.eps is None:
            self.why_python = "RMSNorm epsilons differ between layers"
        else:
            self.script, self.why_python = _scripted()

    def describe(self) -> str:
        how = "TorchScript" if self.script is not None else f"Python loop: {self.why_python}"
        if self.script is not None and self._tensors() is None:
            how = "Python loop: a linear layer is not a plain nn.Linear (quantized)"
        if self.packing is not None:
            how += (f", oneDNN's packed linears at {self.packing.min_rows()}+ rows as the "
                    "forward runs them")
        if self.kernel is None:
            return (f"direct decode step ({len(self.layers)} layers, {how}, bit-identical to "
                    "the forward)")
        if not self.whole:
            where = "in the Python loop (one call per step is off)"
        elif self._prepared(1) is not None:
            where = "each step one call of the kernel (every layer and the attention)"
        else:
            where = f"in the Python loop ({self._prep.why if self._prep else ''})"
        return (f"direct decode step ({len(self.layers)} layers; {self.kernel.describe()}, "
                f"{where}, sums in another order than torch's (greedy outputs "
                f"checked against transformers); larger steps: {how}, bit-identical to the "
                "forward)")

    def _tensors(self, rows: int = 0, dtype: torch.dtype | None = None
                 ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor | None]],
                            list[list[bool]]] | None:
        """Each layer's weights (input norm, q, k, v, o, post-attention norm, gate, up, down),
        the linear layers' biases and, per linear layer, whether it runs packed for a step
        of ``rows`` rows of ``dtype`` (then its weight here is the packed copy: exactly
        where its ``PackedForward`` would take it), read now (never cached: see
        ``_apply``); None when a linear layer is not a plain ``nn.Linear``."""
        weights, biases, flags = [], [], []
        for norm1, attn, norm2, mlp in self.layers:
            linears = (attn["q_proj"], attn["k_proj"], attn["v_proj"], attn["o_proj"],
                       mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"])
            if any(m.__class__ is not _LINEAR for m in linears):
                return None
            w, f = [], []
            for m in linears:
                fwd = packed_forward(m)
                if fwd is not None and fwd.takes_rows(rows, dtype):
                    w.append(fwd.packed)
                    f.append(True)
                else:
                    w.append(m._parameters["weight"])
                    f.append(False)
            weights.append([norm1._parameters["weight"], *w[:4],
                            norm2._parameters["weight"], *w[4:]])
            biases.append([m._parameters["bias"] for m in linears])
            flags.append(f)
        return weights, biases, flags

    def step(self, ids: torch.Tensor, positions: torch.Tensor, kv: Any,
             padded: torch.Tensor | None) -> torch.Tensor:
        """Logits ``(rows, vocab)`` for one new token per row. ``ids`` and ``positions``
        are ``(rows, 1)``; ``padded`` is ``(rows, width + 1)`` boolean, True where a row
        attends (None when no row has padding in the span). Writes each layer's new keys
        and values into column ``kv.end`` (the caller advances it)."""
        rows, d = ids.shape[0], self.head_dim
        x = self.embed(ids)
        dtype = x.dtype
        # rotary: as LlamaRotaryEmbedding.forward computes it (float32, then the dtype)
        freqs = positions[..., None].float() * self.rotary.inv_freq.to(device=x.device,
                                                                       dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = self.rotary.attention_scaling
        cos = (emb.cos() * scaling).to(dtype).unsqueeze(1)
        sin = (emb.sin() * scaling).to(dtype).unsqueeze(1)
        mask = padded[:, None, None, :] if padded is not None else None
        n, start, end = kv.n, kv.start, kv.end
        apply, flat = _apply, None
        if self.kernel is not None and self.kernel.active(rows):
            apply = self._kernel_apply
            # the kernel takes the rotary tables flat: (rows, head_dim) each
            flat = (cos.reshape(rows, d).contiguous(), sin.reshape(rows, d).contiguous())
            logits = self._whole(x, flat, kv, padded)
            if logits is not None:
                return logits
        tensors = self._tensors(rows, dtype) if self.script is not None and apply is _apply \
            else None
        if tensors is not None:
            assert self.eps is not None  # a script is only made with one epsilon
            x = self.script(x, cos, sin, kv.k, kv.v, n, start, end, mask, tensors[0],
                            tensors[1], tensors[2], float(self.eps), d, self.kv_heads,
                            self.groups, float(self.scaling))
            x = _rms(x, self.final_norm)
            return _apply(self.model._modules["lm_head"], x)[:, -1]
        gemv = self.kernel.kernel if apply is not _apply and self.kernel is not None else None
        rotary = flat if cos.dtype == torch.float32 else None
        for i, (norm1, attn, norm2, mlp) in enumerate(self.layers):
            fused = rotary is not None and self._fusable(norm1, attn, norm2, mlp, x)
            if fused:  # RMSNorm, q, k, v and the rotary embedding in one call of the kernel
                assert gemv is not None
                qkv = gemv.norm_qkv(x, norm1._parameters["weight"], norm1.variance_epsilon,
                                    [_struct(attn[p]) for p in ("q_proj", "k_proj", "v_proj")],
                                    rotary)
                nq, nk = attn["q_proj"].out_features, attn["k_proj"].out_features
                q = qkv[..., :nq].view(rows, 1, -1, d).transpose(1, 2)
                k = qkv[..., nq:nq + nk].view(rows, 1, -1, d).transpose(1, 2)
                v = qkv[..., nq + nk:].view(rows, 1, -1, d).transpose(1, 2)
            else:
                h = _rms(x, norm1)
                q = apply(attn["q_proj"], h).view(rows, 1, -1, d).transpose(1, 2)
                k = apply(attn["k_proj"], h).view(rows, 1, -1, d).transpose(1, 2)
                v = apply(attn["v_proj"], h).view(rows, 1, -1, d).transpose(1, 2)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            kv.k[i, :n, :, end:end + 1] = k
            kv.v[i, :n, :, end:end + 1] = v
            keys = kv.k[i, :n, :, start:end + 1]
            values = kv.v[i, :n, :, start:end + 1]
            if self.groups == 1:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                   scale=self.scaling)
            elif mask is None:
                o = F.scaled_dot_product_attention(q, keys, values, scale=self.scaling,
                                                   enable_gqa=True)
            else:  # one query per row: the group's heads side by side, as transformers does
                o = F.scaled_dot_product_attention(
                    q.reshape(rows, self.kv_heads, self.groups, d), keys, values,
                    attn_mask=mask, scale=self.scaling)
            o = o.reshape(rows, -1, 1, d).transpose(1, 2).contiguous()
            if fused:  # the output projection with its residual; the MLP block whole
                assert gemv is not None
                x = gemv.linear(o.reshape(rows, 1, -1), _struct(attn["o_proj"]), x)
                x = gemv.mlp(x, norm2._parameters["weight"], norm2.variance_epsilon,
                             *(_struct(mlp[p]) for p in ("gate_proj", "up_proj", "down_proj")))
                continue
            x = x + apply(attn["o_proj"], o.reshape(rows, 1, -1).contiguous())
            h = _rms(x, norm2)
            x = x + apply(mlp["down_proj"], F.silu(apply(mlp["gate_proj"], h)) *
                          apply(mlp["up_proj"], h))
        x = _rms(x, self.final_norm)
        return apply(self.model._modules["lm_head"], x)[:, -1]

    def _whole(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], kv: Any,
               padded: torch.Tensor | None) -> torch.Tensor | None:
        """The step as one call of the kernel (``sureserve_decode``: every layer, the
        attention over the cache included, and lm_head when the kernel reads it), or None
        when it cannot take this step (then the layer loop runs). ``rotary``: the flat
        (rows, head_dim) cos and sin tables."""
        rows = x.shape[0]
        prep = self._prepared(rows) if self.whole else None
        if prep is None or x.dtype != torch.float32 or kv.k.dtype != torch.float32 \
                or not kv.k.is_contiguous() or not kv.v.is_contiguous():
            return None
        assert self.kernel is not None and self.kernel.kernel is not None
        gemv = self.kernel.kernel
        d = self.head_dim
        need = gemv.scratch_size(rows, x.shape[-1], prep.layers[0], self.heads, d)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        h = x.reshape(rows, -1).contiguous()
        mask = padded.contiguous() if padded is not None else None
        assert self.eps is not None
        head = prep.head if prep.head_rows[rows] else None
        logits = gemv.decode(h, prep.layers, self.eps, rotary, self.heads, self.kv_heads,
                             float(self.scaling), kv, mask, self._scratch, prep.final_norm,
                             head)
        if logits is not None:
            return logits
        h = _rms(h.view(rows, 1, -1), self.final_norm)
        return self._kernel_apply(self.model._modules["lm_head"], h)[:, -1]

    def _prepared(self, rows: int) -> _Prepared | None:
        """The layers as the kernel's structures, made again whenever a linear layer or
        its weight was swapped (``sureserve quantize`` swaps layers of a live model) or
        changed in place (then its panels are stale: it runs row-major; the checks cost
        ~0.1 ms a step), or None when a layer is not one the kernel reads (see
        ``_Prepared.make``). Every layer goes through the kernel, even a shape that alone
        measured no faster than torch's at this many rows: the step as a whole was measured
        faster up to ``max_rows`` (``native.plan``), and the alternative is the layer loop
        in Python; lm_head, which can run outside, goes through it only where it won."""
        mods = [parent[name] for parent, name in self._slots]
        weights = [m._parameters.get("weight") if m.__class__ is _LINEAR
                   else m._buffers.get("weight_int8") for m in mods]
        prep = self._prep
        if prep is None or any(a is not b for a, b in zip(mods, prep.modules, strict=True)) \
                or any(a is not b for a, b in zip(weights, prep.weights, strict=True)) \
                or any(_version(a) != v for a, v in zip(weights, prep.versions, strict=True)):
            assert self.kernel is not None
            prep = self._prep = _Prepared.make(self, mods, weights)
        if not prep.ok:
            return None
        if rows not in prep.head_rows:
            assert self.kernel is not None
            prep.head_rows[rows] = prep.head is not None and \
                self.kernel.takes(prep.weights[-1], rows)
        return prep

    def _fusable(self, norm1: Any, attn: dict[str, Any], norm2: Any, mlp: dict[str, Any],
                 x: torch.Tensor) -> bool:
        """Whether a layer runs as the kernel's fused calls: every linear layer a plain
        float32 ``nn.Linear`` the kernel takes, planned for this many rows, no MLP biases,
        float32 norms and input. Checked at every step (``sureserve quantize`` swaps layers
        of a live model)."""
        assert self.kernel is not None and self.kernel.kernel is not None
        gemv, rows = self.kernel.kernel, x.shape[0]
        f32 = torch.float32
        if x.dtype != f32 or norm1._parameters["weight"].dtype != f32 \
                or norm2._parameters["weight"].dtype != f32:
            return False
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m = attn[name]
            if m.__class__ is not _LINEAR or not gemv.takes_weight(m.weight, m.bias) \
                    or not self.kernel.takes(m.weight, rows):
                return False
        for name in ("gate_proj", "up_proj", "down_proj"):
            m = mlp[name]
            if m.__class__ is not _LINEAR or m.bias is not None \
                    or not gemv.takes_weight(m.weight, None) \
                    or not self.kernel.takes(m.weight, rows):
                return False
        return True

    def _kernel_apply(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """``_apply`` through the GEMV kernel where it takes the layer (a plain float32
        ``nn.Linear`` with a contiguous weight, or an int8 weight-only layer) at this many
        rows; anything else as ``_apply``."""
        assert self.kernel is not None and self.kernel.kernel is not None
        gemv = self.kernel.kernel
        if module.__class__ is _LINEAR:
            p = module._parameters
            w, b = p["weight"], p["bias"]
            if self.kernel.takes(w, x.shape[0]) and gemv.accepts(x, w, b):
                return gemv.linear(x, _struct(module))  # with its panels, where it has them
        elif x.dtype == torch.float32:  # an int8 weight-only layer (weights_of says)
            from sureserve.generation.native import struct_of, weights_of, widen_of

            got = weights_of(module)
            if got is not None and x.shape[-1] == got[0].shape[1] \
                    and self.kernel.takes(got[0], x.shape[0]):
                return gemv.linear(x, struct_of(got, None, widen_of(module)))
        return _apply(module, x)


class _Prepared:
    """``DirectDecode``'s layers as ``gemv.c`` reads them, for the whole-step call: made
    once per set of linear layers (it holds them, so that their identity is a valid key)."""

    def __init__(self, modules: list[Any], weights: list[Any]) -> None:
        self.modules, self.weights = modules, weights
        self.versions = [_version(w) for w in weights]  # in-place changes since
        self.ok = False  # whether every layer is one the kernel takes
        self.why = ""
        self.layers: Any = None
        self.head: Any = None  # lm_head's structure, or None: lm_head runs outside
        self.final_norm: torch.Tensor | None = None
        # held: the structures point into these (norms; each layer's weight, scale, bias)
        self.norms: list[torch.Tensor] = []
        self.tensors: list[Any] = []
        # rows -> whether lm_head goes through the kernel at that many rows
        self.head_rows: dict[int, bool] = {}

    @classmethod
    def make(cls, direct: DirectDecode, modules: list[Any], weights: list[Any]) -> _Prepared:
        from sureserve.generation import native

        self = cls(modules, weights)
        f32 = torch.float32
        d = direct.head_dim
        if direct.eps is None or d % 2 or d > native.MAX_HEAD_DIM \
                or direct.heads % direct.kv_heads:
            self.why = "head size or norms the kernel's step does not take"
            return self
        norms = [direct.final_norm._parameters["weight"]]
        layers = []
        per = len(native.LAYER_LINEARS)
        for i, (norm1, _, norm2, _) in enumerate(direct.layers):
            n1, n2 = norm1._parameters["weight"], norm2._parameters["weight"]
            norms += [n1, n2]
            mods = modules[i * per:(i + 1) * per]
            got = [native.weights_of(m) for m in mods]
            if any(g is None for g in got):
                self.why = "a linear layer is neither float32 nor int8 weight-only"
                return self
            panels = [native.panels_of(m) for m in mods]
            self.tensors += got + [p.panels for p in panels if p is not None]
            layers.append(native.Layer(n1.data_ptr(), n2.data_ptr(),
                                       *(native.struct_of(g, p, native.widen_of(m))
                                         for g, p, m in zip(got, panels, mods, strict=True)
                                         if g is not None)))
        if any(n.dtype != f32 or not n.is_contiguous() for n in norms):
            self.why = "a norm is not float32"
            return self
        q, k = layers[0].q, layers[0].k
        if q.n != direct.heads * d or k.n != direct.kv_heads * d:
            self.why = "unexpected q/k/v widths"
            return self
        self.layers = (native.Layer * len(layers))(*layers)
        # lm_head inside the call only after a final norm of the layers' epsilon (the
        # kernel takes one); otherwise both run outside it
        head = native.weights_of(modules[-1])
        if head is not None and direct.final_norm.variance_epsilon == direct.eps:
            head_panels = native.panels_of(modules[-1])
            self.head = native.struct_of(head, head_panels, native.widen_of(modules[-1]))
            self.tensors += [head] + ([head_panels.panels] if head_panels else [])
        self.final_norm = norms[0]
        self.norms = norms
        self.ok = True
        return self


def _version(t: Any) -> int | None:
    return None if t is None else tensor_version(t)


def _struct(module: Any) -> Any:
    """A float32 ``nn.Linear`` the kernel takes (the caller checked) as its ``Linear``, with
    its panels where it has fresh ones."""
    from sureserve.generation.native import linear_struct

    got = linear_struct(module)
    assert got is not None
    return got


def _rms(x: torch.Tensor, norm: Any) -> torch.Tensor:
    return _rms_weight(x, norm._parameters["weight"], norm.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _layers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
            cache_v: torch.Tensor, n: int, start: int, end: int, mask: torch.Tensor | None,
            weights: list[list[torch.Tensor]], biases: list[list[torch.Tensor | None]],
            packed: list[list[bool]], eps: float, d: int, kv_heads: int, groups: int,
            scaling: float) -> torch.Tensor:
    """``DirectDecode.step``'s layer loop over plain tensors, operation for operation (the
    tests hold both to the model's forward with ``torch.equal``), for TorchScript."""
    rows = x.shape[0]
    # views over every layer taken once per step (the loop below then selects a layer: one
    # operation instead of four per write or read; the same elements)
    new_k, new_v = cache_k[:, :n, :, end:end + 1], cache_v[:, :n, :, end:end + 1]
    span_k, span_v = cache_k[:, :n, :, start:end + 1], cache_v[:, :n, :, start:end + 1]
    for i in range(len(weights)):
        w, b, p = weights[i], biases[i], packed[i]
        h = _rms_weight(x, w[0], eps)
        q = _lin(h, w[1], b[0], p[0]).view(rows, 1, -1, d).transpose(1, 2)
        k = _lin(h, w[2], b[1], p[1]).view(rows, 1, -1, d).transpose(1, 2)
        v = _lin(h, w[3], b[2], p[2]).view(rows, 1, -1, d).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        new_k[i].copy_(k)
        new_v[i].copy_(v)
        keys, values = span_k[i], span_v[i]
        if groups == 1:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        elif mask is None:
            o = F.scaled_dot_product_attention(q, keys, values, scale=scaling, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q.reshape(rows, kv_heads, groups, d), keys,
                                               values, attn_mask=mask, scale=scaling)
        o = o.reshape(rows, -1, 1, d).transpose(1, 2).contiguous()
        x = x + _lin(o.reshape(rows, 1, -1).contiguous(), w[4], b[3], p[3])
        h = _rms_weight(x, w[5], eps)
        x = x + _lin(F.silu(_lin(h, w[6], b[4], p[4])) * _lin(h, w[7], b[5], p[5]), w[8],
                     b[6], p[6])
    return x


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, packed: bool
         ) -> torch.Tensor:
    """``F.linear``, or oneDNN's packed product when ``w`` is a packed copy
    (``loading/packed.py``): the op ``PackedForward`` calls, spelled so TorchScript takes
    it (its ``scalars`` argument needs this exact list type)."""
    if packed:
        return torch.ops.mkldnn._linear_pointwise(
            x, w, b, "none", torch.jit.annotate(list[int | float | complex | None], []),
            "")
    return F.linear(x, w, b)


def _rms_weight(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, operation for operation."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


_SCRIPT: list[Any] = []  # the scripted _layers, made once per process


def _scripted() -> tuple[Any, str]:
    """(the scripted layer loop, "") or (None, why it is unavailable)."""
    if not _SCRIPT:
        try:
            _SCRIPT.append(torch.jit.script(_layers))
        except Exception as exc:  # a torch without TorchScript, or one that cannot script it
            log.warning("decode layers stay in Python: TorchScript failed (%s)", exc)
            _SCRIPT.append(f"TorchScript unavailable ({type(exc).__name__})")
    got = _SCRIPT[0]
    return (None, got) if isinstance(got, str) else (got, "")


@dataclass
class DecodePlan:
    """Which decode step runs, and why (``/info``)."""

    direct: DirectDecode | None
    reason: str

    def describe(self) -> str:
        if self.direct is not None:
            return self.direct.describe()
        return f"decode step through the model's forward: {self.reason}"


def plan(model: Any, enabled: bool = True, script: bool = True,
         kernel: Any = None, whole: bool = True, packing: Any = None,
         home: Path | None = None, calibrate: bool = True) -> DecodePlan:
    """``script``: the layers in TorchScript where possible (``decode_script``);
    ``kernel``: a ``native.KernelPlan`` (``decode_kernel``) for steps of few rows;
    ``packing``: the model's ``loading.packed.PackPlan`` (``packed_linear``). With
    ``calibrate``, where the kernel can take whole steps, the row counts it serves are
    chosen by timing whole steps of both paths on this model (``calibrate_steps``, cached
    under ``home``)."""
    from sureserve.generation import native

    reason = "direct_decode is off" if not enabled else why_not(model)
    if reason is None and calibrate and whole and kernel is not None \
            and kernel.kernel is not None:
        calibrate_steps(model, kernel, script, packing, home)
    if kernel is not None and (reason is not None or not kernel.max_rows):
        native.drop_panels(model, kernel)  # nothing reads them
    if reason is not None:
        return DecodePlan(None, reason)
    return DecodePlan(DirectDecode(model, script, kernel, whole, packing), "")


#: key/value columns in the cache while whole steps are timed (a chat's prompt and the
#: first replies; the attention is a small part of a step at this length)
CALIBRATION_CONTEXT = 64


def calibrate_steps(model: Any, kernel: Any, script: bool, packing: Any,
                    home: Path | None) -> None:
    """Choose up to how many rows the kernel's whole-step call serves by timing whole
    decode steps, kernel against torch's path (TorchScript, oneDNN's packed linears where
    they run), at each of ``native.ROWS`` on this model (random cache of
    ``CALIBRATION_CONTEXT`` columns; cached per machine, kernel build and model shape).

    Why: per-shape timings, one matmul per call, charge each small product a call and a
    parallel region that the one-call step does not pay, and miss what the step saves
    between the matmuls: on smollm2 (AMD EPYC) they put the kernel at 1.14x torch's at 4
    rows, under the margin, where whole steps measured 2.1x (12.9 vs 27.7 ms) and still
    1.39x at 32 rows. Sets ``kernel.max_rows`` (the longest run of row counts from one
    where the kernel's step won by ``native.MIN_GAIN``) and ``kernel.whole_ms``; a model
    the whole step cannot take (``_Prepared``) keeps the per-shape plan."""
    import dataclasses

    from sureserve.generation import native
    from sureserve.loading.machine import measured_once

    top = max(native.ROWS)
    trial = dataclasses.replace(kernel, max_rows=top)
    fast = DirectDecode(model, script, trial, True, packing)
    if fast.kernel is None or fast._prepared(1) is None:
        return
    slow = DirectDecode(model, script, None, True, packing)
    cfg = model.config
    name = ":".join(str(v) for v in (
        type(model).__name__, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
        cfg.num_attention_heads, cfg.num_key_value_heads, fast.head_dim,
        _vocab(model), CALIBRATION_CONTEXT,
        sorted(kernel.panel_rows.items()), sorted(kernel.shape_rows.items()),
        None if packing is None else packing.min_rows(), script and fast.script is not None))

    def measure() -> dict[str, list[float]]:
        return {str(r): list(_time_steps(model, fast, slow, r)) for r in native.ROWS}

    def parse(v: Any) -> dict[int, tuple[float, float]]:
        return {int(r): (float(a), float(b)) for r, (a, b) in v.items()}

    got = measured_once(home, f"decode-step-{kernel.kernel.key}", name, measure, parse)
    max_rows = 0
    for rows in native.ROWS:
        if rows not in got or got[rows][0] < got[rows][1] * native.MIN_GAIN:
            break
        max_rows = rows
    kernel.whole_ms = got
    kernel.max_rows = max_rows
    if not max_rows:
        kernel.reason = (f"its whole step is no faster than torch's here ({got[1][1]:.1f} vs "
                         f"{got[1][0]:.1f} ms at 1 row)")
    log.info("decode steps: %s", kernel.describe())


def _vocab(model: Any) -> int:
    """The logits' width: lm_head's rows, read from what any head has (an int8 weight-only
    head, ``int8-weight-only-head``, keeps no float ``weight``)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", 0) or model.config.vocab_size)


def _time_steps(model: Any, fast: DirectDecode, slow: DirectDecode, rows: int
                ) -> tuple[float, float]:
    """(torch's path ms, the kernel's ms) for one decode step of ``rows`` rows over a
    random cache, best of 3 each, alternated (drift of the machine hits both)."""
    from sureserve.generation.kvcache import PaddedKV
    from sureserve.loading.machine import best_ms

    cfg, d = model.config, fast.head_dim
    dtype = model.get_input_embeddings().weight.dtype
    kv = PaddedKV(cfg.num_hidden_layers, cfg.num_key_value_heads, d, dtype, "cpu",
                  max_rows=rows)
    gen = torch.Generator().manual_seed(0)
    for _ in range(rows):
        part = [torch.randn(1, cfg.num_key_value_heads, CALIBRATION_CONTEXT, d,
                            generator=gen).to(dtype) for _ in range(cfg.num_hidden_layers)]
        kv.add_row(part, part)
    kv.reserve(1)
    ids = torch.randint(0, int(cfg.vocab_size), (rows, 1), generator=gen)
    pos = torch.full((rows, 1), CALIBRATION_CONTEXT)
    a = b = float("inf")
    with torch.inference_mode():
        for _ in range(2):
            a = min(a, best_ms(lambda: slow.step(ids, pos, kv, None), 3))
            b = min(b, best_ms(lambda: fast.step(ids, pos, kv, None), 3))
    return a, b
