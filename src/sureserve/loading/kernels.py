"""Quantized replacements for ``torch.nn.Linear`` on CPU, and putting them into a model
(imported only when quantizing or loading a quantized folder). What each method is lives
in ``precision.py``; this module is the only one that builds its layers."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import subprocess
import threading
import warnings
import weakref
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import per_channel_dynamic_qconfig

from sureserve.errors import SettingsError
from sureserve.loading.machine import best_ms
from sureserve.loading.packed import (
    BlockForward,
    FusedGelu,
    _erf_gelu,
    install_if_same,
    tensor_version,
)
from sureserve.loading.precision import INT4_GROUP, Method, linear_layers

log = logging.getLogger("sureserve.loading")


def int8_dynamic(linear: torch.nn.Linear) -> torch.nn.Module:
    # per-channel weight scales: per-tensor ones cost minilm cosine 0.75 vs 0.90 (measured)
    linear.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
    return DynamicLinear.from_float(linear.float())


@functools.cache
def activation_dtype(kind: str) -> torch.dtype:
    """The activation dtype torch's packed ``kind`` ("int8" or "int4") CPU matmul runs
    fastest in on this machine, measured once per process (~20 ms): one row times a
    1536 x 576 weight, fp32 against bf16 activations.

    Measured on an AVX2-only EPYC (BENCHMARKS.md "int8/int4 weight-only kernels"): with
    fp32 activations these kernels take a slow path (int8 1.9x *slower* than an fp32
    ``F.linear`` at one row, 18x at 32 rows); with bf16 activations they run 3x faster
    than fp32 at one row and level at 32. That slow path is why these candidates measured
    0.03-0.11x fp32 before. The cost is bf16 rounding of the activations entering each
    quantized layer (8 mantissa bits, the same order as the int8 weights' own error), which
    ``sureserve quantize`` measures like the rest of the method."""
    n, k = 1536, 576
    w = torch.randint(-127, 127, (n, k), dtype=torch.int8)
    scale = torch.rand(n) / 127
    if kind == "int4":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        zeros = torch.stack([torch.rand(k // INT4_GROUP, n), torch.rand(k // INT4_GROUP, n)], -1)

    def run(dt: torch.dtype) -> float:
        x = torch.randn(1, k).to(dt)
        if kind == "int4":
            return best_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, packed, INT4_GROUP, zeros.to(dt)))
        return best_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, w, scale.to(dt)))

    fp32, bf16 = run(torch.float32), run(torch.bfloat16)
    return torch.bfloat16 if bf16 * 1.2 < fp32 else torch.float32


class Int8WeightOnlyLinear(torch.nn.Module):
    """int8 weights with one scale per output channel; activations in float, rounded to
    bf16 on the way into the kernel where that is measured faster (``activation_dtype``)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dt = x.shape, activation_dtype("int8")
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(dt),
                                               self.weight_int8, self.scale.to(dt))
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias if self.bias is not None else y


class Int4WeightOnlyLinear(torch.nn.Module):
    """4-bit weights, asymmetric, one scale and zero per group of ``INT4_GROUP`` inputs;
    activations as for int8 (``activation_dtype``)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        n, k, g = linear.out_features, linear.in_features, INT4_GROUP
        w = linear.weight.detach().float().reshape(n, k // g, g)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.clamp(torch.round((w - low) / scale), 0, 15).to(torch.int32).reshape(n, k)
        # the kernel computes (q - 8) * scale + zero, so zero is the group's value at q = 8
        zero = low + 8 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", torch.stack(
            [scale.reshape(n, k // g).t(), zero.reshape(n, k // g).t()], -1).contiguous())
        self.bias = linear.bias
        self.in_features, self.out_features = k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dt = x.shape, activation_dtype("int4")
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(dt), self.packed, INT4_GROUP, self.scales_zeros.to(dt))
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias if self.bias is not None else y


#: SmoothQuant's migration strength: how much of an input channel's range moves into the
#: weights (0: none, 1: all). 0.5 measured best for minilm here (min cosine over 1,136
#: texts with every layer in int8: 0.9947 at 0.5, 0.9903 at 0.75, 0.9822 without smoothing)
SMOOTH_ALPHA = 0.5


def smoothing(absmax: torch.Tensor, weight: torch.Tensor,
              alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s``: ``x / s`` and ``W * s`` give the same
    product, with the activation's outlier channels moved partly into the weights (int8
    weights per output channel absorb them far better than int8 activations per token)."""
    a = absmax.float().clamp(min=1e-5)
    w = weight.detach().float().abs().amax(0).clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5, max=1e5)


class RowsKernel:
    """``int8rows.c`` loaded: the per-token quantization and dequantization of
    ``SmoothInt8Linear`` in one pass each, the same bits as the torch operations."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        P, N = ctypes.c_void_p, ctypes.c_int
        self._quant = lib.sureserve_quantize_rows
        self._quant.argtypes, self._quant.restype = [P, P, P, P, N, N], None
        self._dequant = lib.sureserve_dequantize_rows
        self._dequant.argtypes, self._dequant.restype = [P, P, P, P, N, N], None

    def quantize_rows(self, x: torch.Tensor, inv_smooth: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 rows, float32 steps (M, 1)) of ``x`` (M, K) float32 contiguous, each row
        smoothed by ``inv_smooth`` and scaled by its own largest magnitude (zero point
        128)."""
        m, k = x.shape
        q = torch.empty((m, k), dtype=torch.uint8)
        step = torch.empty((m, 1), dtype=torch.float32)
        self._quant(x.data_ptr(), inv_smooth.data_ptr(), q.data_ptr(), step.data_ptr(), m, k)
        return q, step

    def dequantize_rows(self, y: torch.Tensor, step: torch.Tensor, bias: Any,
                        residual: Any = None) -> None:
        """In place: ``y`` (M, N) float32 contiguous times each row's step, plus ``bias``,
        plus ``residual`` (M, N) float32 contiguous when given."""
        m, n = y.shape
        self._dequant(y.data_ptr(), step.data_ptr(),
                      None if bias is None else bias.data_ptr(),
                      None if residual is None else residual.data_ptr(), m, n)


ROWS_SOURCE = Path(__file__).with_name("int8rows.c")


@functools.cache
def _rows_kernel() -> RowsKernel | None:
    """``int8rows.c`` compiled for this machine (``cbuild.py``, once, under
    ``SURESERVE_HOME/kernels/``); None where it cannot be (no C compiler): then the same
    arithmetic runs as torch operations."""
    from sureserve.loading import cbuild
    from sureserve.settings import Settings

    cc, version, why = cbuild.compiler()
    if cc is None:
        log.info("int8-smooth quantizes with torch operations: %s", why)
        return None
    try:
        so = cbuild.compiled(ROWS_SOURCE, Settings().home_dir(), cc,
                             cbuild.build_key(ROWS_SOURCE, version, "native"))
        return RowsKernel(ctypes.CDLL(str(so)))
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        log.warning("int8-smooth quantizes with torch operations: %s", exc)
        return None


_SCRATCH = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """This thread's float32 scratch of at least ``numel`` elements, kept between calls: a
    fresh rows x 1,536 float tensor per call was paid again in page faults (the smoothing
    step cost as much as an int8 matmul). It grows to the largest input seen (minilm at
    32 texts of 128 tokens: 25 MB per forward worker)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel)
    return buf[:numel]


class TokenQuantizer:
    """Smooths and quantizes a layer input per token, once for every layer that reads it:
    the query, key and value projections of an attention block read the same tensor, and
    quantizing it three times was most of their cost besides the matmuls. The last result
    is kept per thread (forward workers share the model) and reused while the same tensor,
    unchanged, comes again (a weak reference: the input is not kept alive)."""

    def __init__(self, inv_smooth: torch.Tensor, users: int = 1) -> None:
        self.inv_smooth, self.users = inv_smooth, users
        self._local = threading.local()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = self._local
        last = getattr(local, "last", None)
        version = tensor_version(x)
        if last is not None and last[0]() is x and last[1] == version:
            local.uses += 1
            if local.uses >= self.users:  # every sibling has read it: let it go
                local.last = None
            return last[2], last[3]
        flat = x.reshape(-1, x.shape[-1])
        kernel = _rows_kernel()
        if kernel is not None and flat.dtype == torch.float32 and flat.is_contiguous():
            q, step = kernel.quantize_rows(flat, self.inv_smooth)  # the same bits, 2 passes
            self._keep(x, version, q, step)
            return q, step
        # smoothed into this thread's scratch buffer, quantized in place below
        h = _scratch(flat.numel()).view(flat.shape)
        torch.mul(flat, self.inv_smooth, out=h)
        # the largest magnitude per token (two plain reductions: linalg's inf-norm took as
        # long as the int8 matmul itself here)
        step = torch.maximum(h.amax(1, keepdim=True), h.amin(1, keepdim=True).neg_())
        step = step.clamp_(min=1e-8).div_(127)
        q = h.div_(step).round_().add_(128).to(torch.uint8)  # symmetric, zero point 128
        self._keep(x, version, q, step)
        return q, step

    def _keep(self, x: torch.Tensor, version: int | None, q: torch.Tensor,
              step: torch.Tensor) -> None:
        # kept for the siblings (a sibling swapped back to full precision never reads it:
        # then it stays until the next input, one entry per thread)
        self._local.last = (weakref.ref(x), version, q, step) if self.users > 1 else None
        self._local.uses = 1

    def __getstate__(self) -> dict[str, Any]:
        return {"inv_smooth": self.inv_smooth, "users": self.users}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["inv_smooth"], state.get("users", 1))  # type: ignore[misc]


@functools.cache
def int8_pairs_saturate() -> bool:
    """Whether oneDNN's u8 x s8 matmul loses precision on this CPU, measured once per
    process on the worst case (every activation 255, every weight 127).

    Without VNNI (an AVX2-only EPYC) oneDNN multiplies with ``vpmaddubsw``, which adds
    each pair of u8 x s8 products into a saturating int16: 255 x 127 x 2 does not fit, and
    random full-range weights there gave errors of 18% of the output's range (oneDNN's
    "Nuances of int8 computations"). VNNI sums into int32 and is exact. Measured, not read
    from CPU flags; no oneDNN int8 op here: False (the int8 path is not used then)."""
    k, n = 64, 8
    w = torch.full((n, k), 127, dtype=torch.int8)
    x = torch.full((2, k), 255, dtype=torch.uint8)
    try:
        y = torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 128, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(n),
            torch.zeros(n, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    exact = 127.0 * 127.0 * k
    return bool((y - exact).abs().max() > 0.5)


def int8_levels() -> int:
    """Largest int8 weight magnitude the int8 matmul takes exactly here: 127, or 63 (7 bits)
    where u8 x s8 pairs saturate, so that 255 x 63 x 2 fits an int16 (fbgemm narrows its
    range on such CPUs for the same reason)."""
    return 63 if int8_pairs_saturate() else 127


class SmoothInt8Linear(torch.nn.Module):
    """int8 weights (one scale per output channel) times int8 activations quantized per
    token, through oneDNN's int8 matmul (VNNI where the CPU has it), after SmoothQuant's
    per-channel smoothing measured on the calibration texts (``smoothing``).

    Per token, not per call: a text's activations are scaled by their own range only, so
    its result never depends on the other texts of the batch (torch's dynamic int8 scales
    per call, which the gate's batch-invariance probe catches on classifiers), and no
    calibrated range can clip an unseen text's outlier (static per-tensor scales measured
    min cosine 0.983 here, per token 0.9947). The smoothing factors are the only thing
    calibrated; they are a rescaling, so a text outside the calibration range costs
    precision, never a clipped value. Layers that read the same input share one
    ``TokenQuantizer`` (and so one smoothing, from all their weights)."""

    weight_int8: torch.Tensor
    scale: torch.Tensor
    inv_smooth: torch.Tensor

    def __init__(self, linear: torch.nn.Linear, smooth: torch.Tensor,
                 quantizer: TokenQuantizer | None = None) -> None:
        super().__init__()
        ws = linear.weight.detach().float() * smooth[None, :]
        levels = int8_levels()  # 7 bits where this CPU's int8 matmul would saturate
        scale = ws.abs().amax(1).clamp(min=1e-8) / levels
        self.register_buffer("weight_int8", torch.round(ws / scale[:, None])
                             .clamp_(-levels, levels).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantizer = quantizer or TokenQuantizer(1.0 / smooth)
        # the quantizer's own factors (one tensor for siblings that share it), not a copy
        self.register_buffer("inv_smooth", self.quantizer.inv_smooth)
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._zeros = torch.zeros(self.out_features, dtype=torch.long)  # weight zero points

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """oneDNN's blocked copy of the weights and their scales, made on first use (a deep
        copy or a reload rebuilds it from ``weight_int8``, the state that is saved). A
        folder quantized on a CPU with VNNI (8-bit weights) and loaded where u8 x s8 pairs
        saturate is narrowed to 7 bits here, not run wrong."""
        if self._packed is None:
            w, scale = self.weight_int8, self.scale
            levels = int8_levels()
            if int(w.abs().max()) > levels:
                w = torch.round(w.float() / 2).clamp_(-levels, levels).to(torch.int8)
                scale = scale * 2
            self._packed = (torch.ops.onednn.qlinear_prepack(w, None), scale)
        return self._packed

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_packed"} | {"_packed": None}

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``linear(x)``, plus ``residual`` (the block's skip connection) when given."""
        shape = x.shape
        q, step = self.quantizer(x)
        packed, scale = self.packed()
        y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, packed, scale,
                                               self._zeros, None, 1.0, 0, torch.float32,
                                               "none", [], "")
        kernel = _rows_kernel()
        bias = self.bias
        res = None if residual is None else residual.reshape(y.shape)
        if kernel is not None and (bias is None or (bias.dtype == torch.float32
                                                    and bias.is_contiguous())) \
                and (res is None or (res.dtype == torch.float32 and res.is_contiguous())):
            kernel.dequantize_rows(y, step, bias, res)  # one pass, the same bits
        else:
            y.mul_(step)  # in place: a new rows x out tensor cost as much as the scaling
            if bias is not None:
                y.add_(bias)
            if res is not None:
                y.add_(res)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def smooth_int8(model: Any, names: Collection[str], calibration: dict[str, torch.Tensor]
                ) -> dict[str, SmoothInt8Linear]:
    """``SmoothInt8Linear`` replacements for ``names``. Siblings (the same parent module)
    whose calibration saw the same input (equal ranges: ``calibrate`` observed one tensor)
    share a ``TokenQuantizer`` and a smoothing computed from all their weights, as
    SmoothQuant smooths the query, key and value projections together."""
    groups: dict[tuple[str, bytes], list[str]] = {}
    for name in names:
        if name not in calibration:
            raise SettingsError(
                f"int8-smooth needs the activation ranges measured on your texts (none for "
                f"layer {name!r})",
                "make the folder with `sureserve quantize MODEL --eval FILE --methods "
                "int8-smooth -o DIR` and load DIR")
        key = (name.rpartition(".")[0],
               calibration[name].float().contiguous().numpy().tobytes())
        groups.setdefault(key, []).append(name)
    out: dict[str, SmoothInt8Linear] = {}
    for (_, _), members in groups.items():
        linears = [model.get_submodule(n) for n in members]
        smooth = smoothing(calibration[members[0]],
                           torch.cat([lin.weight.detach() for lin in linears]))
        shared = TokenQuantizer(1.0 / smooth, len(members))
        for n, lin in zip(members, linears, strict=True):
            out[n] = SmoothInt8Linear(lin, smooth, shared)
    return out


class InplaceGelu(BlockForward):
    """A BERT-style feed-forward block's instance ``forward`` (``*Intermediate``: ``dense``
    then the exact GELU) while ``dense`` is a ``SmoothInt8Linear``: the GELU is written over
    the product (which only this block holds) instead of into a new rows x 1,536 tensor —
    the same kernel, the same bits, without the allocation (GELU was 13% of an int8 minilm
    forward). Any other ``dense`` (a layer the sensitivity search restored) runs the
    block's own forward."""

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        m = self.module
        if type(m.dense) is not SmoothInt8Linear:
            return type(m).forward(m, hidden_states)
        y = m.dense(hidden_states)
        return torch._C._nn.gelu(y, out=y)  # type: ignore[call-arg]


class ResidualNorm(BlockForward):
    """A BERT-style output block's instance ``forward`` (``*Output``/``*SelfOutput``:
    ``dense``, dropout, then ``LayerNorm(h + input_tensor)``) while ``dense`` is a
    ``SmoothInt8Linear`` and the model is evaluating: the skip connection is added in the
    dequantization pass (the same roundings in the same order) instead of a pass of its
    own. Anything else runs the block's own forward."""

    def __call__(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor
                 ) -> torch.Tensor:
        m = self.module
        if type(m.dense) is not SmoothInt8Linear or m.training:
            return type(m).forward(m, hidden_states, input_tensor)
        return m.LayerNorm(m.dense(hidden_states, residual=input_tensor))


def residual_norm(model: Any) -> int:
    """Give each BERT-style output block with an int8-smooth ``dense``, a ``LayerNorm`` and
    an inactive dropout a ``ResidualNorm`` forward, where a probe agrees bit for bit with
    the block's own forward. Returns how many."""
    count = 0
    for m in model.modules():
        dense = getattr(m, "dense", None)
        if type(dense) is not SmoothInt8Linear or "forward" in m.__dict__ or \
                not isinstance(getattr(m, "LayerNorm", None), torch.nn.LayerNorm) or \
                not isinstance(getattr(m, "dropout", None), torch.nn.Dropout) or \
                not type(m).__name__.endswith("Output"):
            continue
        count += install_if_same(m, ResidualNorm(m), torch.randn(3, dense.in_features),
                                 torch.randn(3, dense.out_features))
    return count


def inplace_gelu(model: Any) -> int:
    """Give each BERT-style feed-forward block with an int8-smooth ``dense`` and the exact
    GELU an ``InplaceGelu`` forward, where a probe agrees bit for bit with the block's own
    forward. Returns how many."""
    count = 0
    for m in model.modules():
        if type(getattr(m, "dense", None)) is not SmoothInt8Linear or "forward" in m.__dict__ \
                or not _erf_gelu(getattr(m, "intermediate_act_fn", None)):
            continue
        count += install_if_same(m, InplaceGelu(m), torch.randn(3, m.dense.in_features))
    return count


def calibrate(model: Any, names: Collection[str], run: Callable[[], Any]
              ) -> dict[str, torch.Tensor]:
    """Each named linear layer's largest absolute input per channel over ``run()`` (the
    calibration texts through the model as it serves them). A layer whose block runs it
    inside a fused call (``packed.FusedGelu``) is observed at the block's input, which is
    the layer's input."""
    seen: dict[str, torch.Tensor] = {}
    lock = threading.Lock()  # forward workers run batches side by side

    def observe(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            m = torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]).float(), float("inf"),
                                         dim=0)
            with lock:
                seen[name] = m if name not in seen else torch.maximum(seen[name], m)
        return hook

    handles = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        target = owner if leaf == "dense" and isinstance(owner.__dict__.get("forward"),
                                                         FusedGelu) \
            else model.get_submodule(name)
        handles.append(target.register_forward_pre_hook(observe(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


LAYERS: dict[str, Callable[[torch.nn.Linear], torch.nn.Module]] = {
    "int8-dynamic": int8_dynamic,
    "int8-weight-only": Int8WeightOnlyLinear,
    "int8-weight-only-head": Int8WeightOnlyLinear,
    "int4-weight-only": Int4WeightOnlyLinear,
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch announces that its eager quantization API will move to torchao; we chose it
    # knowingly (it is the fastest int8 path measured here) and pin torch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def quantize_layer(method: Method, linear: Any) -> Any:
    """A quantized replacement for one ``torch.nn.Linear`` (CPU methods)."""
    with _quiet():
        return LAYERS[method.name](linear)


def apply(model: Any, method: Method, keep: Collection[str] = (),
          calibration: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Quantize ``model``'s linear layers in place, except ``keep``; returns the layers that
    stayed in full precision because the kernel cannot take their shape. ``calibration``:
    the measured input ranges a calibrated method needs (``Recipe.calibration``)."""
    if not method.swaps_layers:
        return []
    names = [n for n in linear_layers(model, method.heads) if n not in keep]
    if method.calibrated:
        for name, layer in smooth_int8(model, names, calibration or {}).items():
            model.set_submodule(name, layer)
        inplace_gelu(model)
        residual_norm(model)
        return []
    skipped: list[str] = []
    for name in names:
        linear = model.get_submodule(name)
        if method.name == "int4-weight-only" and linear.in_features % INT4_GROUP:
            skipped.append(name)
            continue
        model.set_submodule(name, quantize_layer(method, linear))
    return skipped
