"""Quantized replacements for ``torch.nn.Linear`` on CPU, and putting them into a model
(imported only when quantizing or loading a quantized folder). What each method is lives
in ``precision.py``; this module is the only one that builds its layers."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import per_channel_dynamic_qconfig

from sureserve.loading.machine import best_ms
from sureserve.loading.precision import INT4_GROUP, Method, linear_layers


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


def apply(model: Any, method: Method, keep: Collection[str] = ()) -> list[str]:
    """Quantize ``model``'s linear layers in place, except ``keep``; returns the layers that
    stayed in full precision because the kernel cannot take their shape."""
    if not method.swaps_layers:
        return []
    skipped: list[str] = []
    for name in linear_layers(model, method.heads):
        if name in keep:
            continue
        linear = model.get_submodule(name)
        if method.name == "int4-weight-only" and linear.in_features % INT4_GROUP:
            skipped.append(name)
            continue
        model.set_submodule(name, quantize_layer(method, linear))
    return skipped
