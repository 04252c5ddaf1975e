"""Linear layers through oneDNN's prepacked weights, where that measured faster (CPU).

Why: ``F.linear`` on a CPU hands ``x @ W.T`` to MKL's GEMM, which re-reads the row-major
weight in a layout it was not blocked for. oneDNN can reorder a weight once, at load, into
the blocked layout its own GEMM streams (``torch.ops.mkldnn._reorder_linear_weight``) and
then multiply by it directly (``torch.ops.mkldnn._linear_pointwise``: the op inductor's
CPU backend emits for frozen linears). Measured on a 2-core AMD EPYC (BENCHMARKS.md
"Generation: oneDNN prepacked linears"): 1.4-1.7x on smollm2's body shapes at 8-32 rows,
2.4-3.6x on its lm_head, 1.1-1.5x at prefill sizes; so a 32-row decode step, a short
prompt's prefill and an encoder's batch all gain. Which shapes gain is the CPU's and the
BLAS build's business, so it is measured here per distinct weight shape and dtype, at the
row counts of ``ROWS``, on copies that stream from memory as a real forward does (cached
per machine, like the decode kernel's figures), and a shape is packed only from the row
count where it won at every larger measured count.

What it costs: the packed copy is a second copy of the weight (the plain one stays: the
GEMV kernel, ``sureserve quantize``, the lock and ``state_dict`` read it), bounded by the
``packed_linear_mb`` setting (shapes that save the most time go first). Its sums run in
another order than MKL's, so outputs differ from an unpacked model in the last bits (max
abs logit difference ~1e-4 on smollm2): greedy generation is compared with
``transformers`` under the near-tie rule in the tests and in ``sureserve bench
generate``; ``packed_linear = false`` keeps ``F.linear`` everywhere.

How it is applied: each packed ``nn.Linear`` gets a ``PackedForward`` as its instance
``forward`` (the module's class, parameters and ``state_dict`` are unchanged, so every
check of the form ``module.__class__ is nn.Linear`` and every swap by ``sureserve
quantize`` keeps working). It takes the packed path only when the input has at least the
shape's ``min_rows`` rows, autograd is off, and the weight is still the one it packed
(same storage, dtype and version: a weight changed in place or converted falls back to
``F.linear``, never to a stale copy). A deep copy or a pickle of the module carries no
packed copy (oneDNN's opaque tensors cannot be copied): it runs ``F.linear``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("sureserve.loading")

#: row counts a shape is measured at (1-16: decode steps; 32: a full decode batch; 128: a
#: prefill or an encoder batch, and what larger ones are taken to be like)
ROWS = (1, 4, 8, 16, 32, 128)
#: the packed product must beat F.linear by this much at a row count (noise margin)
MIN_GAIN = 1.05
#: bytes of weight copies a shape is timed over (so that they come from memory)
STREAM_BYTES = 64 * 2**20


def why_unavailable() -> str | None:
    """None when this torch can pack linear weights with oneDNN; else why not."""
    import torch

    from sureserve.loading.machine import IDEEP_CACHE_ENV

    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if os.environ.get(IDEEP_CACHE_ENV, "").strip() == "0":  # torch 2.13 crashes on it
        return f"{IDEEP_CACHE_ENV}=0 is set (torch's packed ops crash without that cache)"
    ops = getattr(torch.ops, "mkldnn", None)
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        try:
            getattr(ops, name)
        except (AttributeError, RuntimeError):
            return f"this torch has no torch.ops.mkldnn.{name}"
    return None


def tensor_version(x: Any) -> int | None:
    """The tensor's in-place version, or None for an inference tensor (it has none: torch
    raises on ``_version``). Every cached copy of a weight compares it to tell a weight
    changed in place: the packed forward here, the decode kernel's panels and whole-step
    structures (generation/); and ``TokenQuantizer`` for the input its sibling layers share
    (read back to back, nothing writes it in between)."""
    return None if x.is_inference() else x._version


def dtype_unavailable(dtype: Any) -> str | None:
    """None when oneDNN can pack weights of ``dtype`` on this CPU; else why not. torch's
    bfloat16 reorder raises on CPUs without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT (seen
    on an AVX2-only EPYC: loading a bfloat16 model failed in the packing plan)."""
    import torch

    if dtype == torch.bfloat16 and not _bf16_packable():
        return ("oneDNN packs bfloat16 weights only on CPUs with AVX-512 (BW, VL, DQ) or "
                "AVX-NE-CONVERT, which this one lacks")
    return None


def _bf16_packable() -> bool:
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def pack(weight: Any) -> Any:
    """oneDNN's blocked copy of a (out, in) weight (an opaque tensor)."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: Any, packed: Any, bias: Any, post_op: str = "none") -> Any:
    """``F.linear(x, weight, bias)`` through the packed copy of ``weight``; ``post_op``
    ``"gelu"``: its exact GELU, applied inside the product (``FusedGelu``)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post_op, [],
                                              "none" if post_op == "gelu" else "")


class PackedForward:
    """A packed ``nn.Linear``'s instance ``forward`` (see the module docstring)."""

    def __init__(self, module: Any, packed: Any, min_rows: int) -> None:
        self.module, self.packed, self.min_rows = module, packed, min_rows
        self.ptr = 0
        self.version: int | None = 0
        self.dtype: Any = None
        if packed is not None:
            w = module._parameters["weight"]
            self.ptr, self.version, self.dtype = w.data_ptr(), tensor_version(w), w.dtype

    def fresh(self) -> bool:
        """Whether the packed copy is still the layer's weight (same storage, version and
        dtype): a weight changed in place or converted since runs ``F.linear``."""
        w = self.module._parameters["weight"]
        return (self.packed is not None and w.data_ptr() == self.ptr
                and tensor_version(w) == self.version and w.dtype == self.dtype)

    def takes_rows(self, rows: int, dtype: Any) -> bool:
        """Whether an input of ``rows`` rows of ``dtype`` goes through the packed copy,
        autograd aside (the direct decode step asks this before it calls the packed op
        itself, under inference mode)."""
        return dtype == self.dtype and rows >= self.min_rows and self.fresh()

    def takes(self, x: Any) -> bool:
        """Whether ``x`` goes through the packed copy (the packed op has no backward)."""
        import torch

        w = self.module._parameters["weight"]
        return (not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and self.takes_rows(x.numel() // w.shape[1], x.dtype))

    def __call__(self, x: Any) -> Any:
        import torch.nn.functional as F

        p = self.module._parameters
        if self.takes(x):
            return packed_linear(x, self.packed, p["bias"])
        return F.linear(x, p["weight"], p["bias"])

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedForward:
        # the copy of the module is already in ``memo`` (copying it is what led here)
        return PackedForward(copy.deepcopy(self.module, memo), None, self.min_rows)

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module, "min_rows": self.min_rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["module"], None, state["min_rows"])  # type: ignore[misc]


def _erf_gelu(act: Any) -> bool:
    """Whether ``act`` is transformers' exact (erf) GELU module, run as written."""
    import torch.nn.functional as F

    return (type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu
            and "forward" not in act.__dict__)


class BlockForward:
    """A block's instance ``forward`` standing in for its class's (a fused path). It holds
    the block itself, so a deep copy or a pickle of the block carries a stand-in for the
    copy, never one still bound to the original."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return type(self)(copy.deepcopy(self.module, memo))

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["module"])  # type: ignore[misc]


def install_if_same(module: Any, fused: Callable[..., Any], *probe: Any) -> bool:
    """Make ``fused`` the block's ``forward`` when, on ``probe``, it gives the block's own
    output bit for bit (checked, not assumed: a block that does anything else, or takes
    other arguments, keeps its forward). Returns whether it did."""
    import torch

    with torch.inference_mode():
        try:
            want = module(*probe)
        except TypeError:  # another signature: not this pattern
            return False
        got = fused(*probe)
    if got.shape == want.shape and torch.equal(got, want):
        module.forward = fused
        return True
    return False


class FusedGelu(BlockForward):
    """A BERT-style feed-forward block's instance ``forward`` (``*Intermediate``: ``dense``
    then the exact GELU) where ``dense`` is packed: one oneDNN call applies the GELU to the
    product while it is still in cache (its ``gelu`` post-op) instead of a second pass over
    a rows x 1,536 tensor. Measured for rerank-demo's pairs: the separate GELU was 8% of the
    forward, and the fused run 8-9% faster, scores bit-identical. Whenever the packed path
    is not taken (too few rows, autograd, a stale copy), the block's own forward runs."""

    def __call__(self, hidden_states: Any) -> Any:
        m = self.module
        fwd = packed_forward(m.dense)  # looked up each call: a copy re-packs its own layer
        if fwd is not None and fwd.takes(hidden_states):
            return packed_linear(hidden_states, fwd.packed, m.dense._parameters["bias"],
                                 "gelu")
        return type(m).forward(m, hidden_states)


def fuse_gelu(model: Any) -> int:
    """Give each BERT-style feed-forward block whose ``dense`` layer is packed and whose
    activation is the exact GELU a ``FusedGelu`` forward, where a probe through the block's
    own forward and through the fused op agree bit for bit (checked here, not assumed: an
    architecture whose block does anything else keeps its forward). Returns how many."""
    import torch

    count = 0
    for m in model.modules():
        dense = getattr(m, "dense", None)
        if not isinstance(dense, torch.nn.Linear):
            continue
        fwd = packed_forward(dense)
        if fwd is None or not fwd.fresh() or "forward" in m.__dict__ \
                or not _erf_gelu(getattr(m, "intermediate_act_fn", None)):
            continue
        probe = torch.randn(max(fwd.min_rows, 2), dense.in_features).to(fwd.dtype)
        count += install_if_same(m, FusedGelu(m), probe)
    return count


def copy_packed(module: Any) -> Any:
    """A deep copy of ``module`` whose packed linears keep their packed path (a plain deep
    copy runs ``F.linear``): each copied layer packs its own copied weight, from the same
    row count. ``sureserve quantize``'s search restores layers to full precision from such
    copies, so a candidate's kept layers run as they will be served (the served folder is
    packed again at load)."""
    new = copy.deepcopy(module)
    for (_, old), (_, mod) in zip(module.named_modules(), new.named_modules(), strict=True):
        fwd = packed_forward(old)
        if fwd is not None and fwd.fresh():
            mod.forward = PackedForward(mod, pack(mod.weight), fwd.min_rows)
    return new


def packed_forward(module: Any) -> PackedForward | None:
    """The module's ``PackedForward`` when it has one."""
    fwd = module.__dict__.get("forward")
    return fwd if isinstance(fwd, PackedForward) else None


@dataclass
class ShapePack:
    """One distinct weight shape and dtype: its measurement and the verdict."""

    shape: tuple[int, int]  # (out, in)
    dtype: str
    layers: int
    ms: dict[int, tuple[float, float]]  # rows -> (F.linear ms, packed ms), per matrix
    min_rows: int | None  # packed from this many rows (None: not faster)
    packed: bool = False  # within the byte bound
    why: str = ""  # why a faster shape is not packed

    @property
    def bytes(self) -> int:
        size = 2 if self.dtype in ("bfloat16", "float16") else 4
        return self.shape[0] * self.shape[1] * size * self.layers

    def saving_ms(self) -> float:
        """Time one forward of 32 rows saves on this shape's layers (the bound's order)."""
        a, b = self.ms.get(32, (0.0, 0.0))
        return (a - b) * self.layers

    def describe(self) -> str:
        head = f"{self.shape[0]}x{self.shape[1]} {self.dtype} x{self.layers}"
        if self.min_rows is None:
            return f"{head}: F.linear (packed no faster)"
        gains = ", ".join(f"{a / max(b, 1e-9):.2f}x at {r}" for r, (a, b) in self.ms.items()
                          if r >= self.min_rows)
        if not self.packed:
            return f"{head}: F.linear ({self.why}; packed measured {gains})"
        return f"{head}: packed from {self.min_rows} rows ({gains})"


@dataclass
class PackPlan:
    """What runs: the path, the shapes and why (``/info``'s ``packed_linear``)."""

    path: str  # "measured" | "off: <why>"
    shapes: list[ShapePack] = field(default_factory=list)
    seconds: float = 0.0
    max_bytes: int = 0
    fused_gelu: int = 0  # feed-forward blocks whose GELU runs inside the packed product

    @property
    def packed_bytes(self) -> int:
        return sum(s.bytes for s in self.shapes if s.packed)

    @property
    def packed_layers(self) -> int:
        return sum(s.layers for s in self.shapes if s.packed)

    def min_rows(self) -> int | None:
        """The fewest rows at which any packed shape takes the packed path."""
        rows = [s.min_rows for s in self.shapes if s.packed and s.min_rows is not None]
        return min(rows) if rows else None

    def active(self, rows: int) -> bool:
        low = self.min_rows()
        return low is not None and rows >= low

    def packed_ms(self, shape: tuple[int, int], dtype: str, rows: int) -> float | None:
        """The packed product's measured ms for a packed shape at ``rows`` (where it takes
        the packed path), else None: ``native.plan`` weighs its kernel against it."""
        for s in self.shapes:
            if s.packed and s.shape == shape and s.dtype == dtype and s.min_rows is not None \
                    and rows >= s.min_rows and rows in s.ms:
                return s.ms[rows][1]
        return None

    def describe(self) -> str:
        if not self.shapes:
            return f"linear layers through F.linear ({self.path})"
        return (f"oneDNN packed linears: {self.packed_layers} layers "
                f"({self.packed_bytes / 2**20:.0f} MiB of packed copies, bound "
                f"{self.max_bytes / 2**20:.0f} MiB; measured in {self.seconds:.1f}s"
                + (f"; GELU fused into {self.fused_gelu} of them" if self.fused_gelu else "")
                + "): " + "; ".join(s.describe() for s in self.shapes))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "packed_layers": self.packed_layers,
                "packed_mb": round(self.packed_bytes / 2**20, 1),
                "max_mb": round(self.max_bytes / 2**20, 1),
                "min_rows": self.min_rows(), "seconds": round(self.seconds, 2),
                "fused_gelu": self.fused_gelu,
                "shapes": [{"shape": list(s.shape), "dtype": s.dtype, "layers": s.layers,
                            "min_rows": s.min_rows, "packed": s.packed, "why": s.why,
                            "ms": {str(r): [round(a, 4), round(b, 4)]
                                   for r, (a, b) in s.ms.items()}}
                           for s in self.shapes]}


def measure(n: int, k: int, rows: int, dtype: Any, stream_bytes: int = STREAM_BYTES
            ) -> tuple[float, float]:
    """(F.linear ms, packed ms) for one ``(n, k)`` weight at ``rows`` rows, per matrix,
    over copies that add up to ``stream_bytes`` (at most 256 copies), alternated."""
    import torch
    import torch.nn.functional as F

    from sureserve.loading.machine import best_ms

    size = torch.tensor([], dtype=dtype).element_size()
    copies = min(256, max(1, stream_bytes // (n * k * size)))
    ws = [torch.empty(n, k).uniform_(-1, 1).to(dtype) for _ in range(copies)]
    ps = [pack(w) for w in ws]
    x = torch.randn(rows, k).to(dtype)

    def plain() -> None:
        for w in ws:
            F.linear(x, w)

    def packed() -> None:
        for p in ps:
            packed_linear(x, p, None)

    a = b = float("inf")
    with torch.inference_mode():
        for _ in range(3):  # alternated, best of each: the machine's drift hits both
            a = min(a, best_ms(plain, 1))
            b = min(b, best_ms(packed, 1))
    return a / copies, b / copies


def _measured(home: Path | None, n: int, k: int, rows: int, dtype: Any
              ) -> tuple[float, float]:
    """``measure``, cached per machine (``machine.measured_once``)."""
    from sureserve.loading.machine import measured_once

    def parse(v: Any) -> tuple[float, float]:
        a, b = v
        return float(a), float(b)

    name = f"{n}x{k}:{rows}:{str(dtype).removeprefix('torch.')}"
    # also kept for the process: an engine loaded with another home (a test's, a quantize
    # candidate's) reads this process's figure instead of measuring the machine again
    memo = (_ident(), name)
    if memo not in _MEMO:
        _MEMO[memo] = measured_once(home, "packed", name,
                                    lambda: list(measure(n, k, rows, dtype)), list)
    elif home is not None:  # stored in that home too, as if measured there
        measured_once(home, "packed", name, lambda: _MEMO[memo], list)
    return parse(_MEMO[memo])


_MEMO: dict[tuple[str, str], list[float]] = {}


def _ident() -> str:
    from sureserve.loading.machine import speeds_path

    return speeds_path(Path("/")).name  # the CPU model, torch version and thread count


def choose_min_rows(ms: dict[int, tuple[float, float]]) -> int | None:
    """The fewest measured rows from which the packed product won (by MIN_GAIN) at every
    larger measured count; None when it did not win at the largest."""
    best = None
    for rows in sorted(ms, reverse=True):
        a, b = ms[rows]
        if a < b * MIN_GAIN:
            break
        best = rows
    return best


def plan_and_apply(model: Any, device: str, home: Path | None = None, enabled: bool = True,
                   max_bytes: int = 1024 * 2**20) -> PackPlan:
    """Measure each distinct plain ``nn.Linear`` weight shape of ``model`` (cached under
    ``home``) and pack the layers of the shapes that are faster packed, within
    ``max_bytes`` of packed copies. Done once per model (a second engine on it gets the
    same plan)."""
    done = getattr(model, "_sureserve_packed", None)
    if isinstance(done, PackPlan):
        return done
    plan = _plan(model, device, home, enabled, max_bytes)
    model._sureserve_packed = plan
    return plan


def _plan(model: Any, device: str, home: Path | None, enabled: bool,
          max_bytes: int) -> PackPlan:
    import torch

    if not enabled:
        return PackPlan("off: packed_linear = false")
    if not str(device).startswith("cpu"):
        return PackPlan("off: not a CPU")
    why = why_unavailable()
    if why is not None:
        return PackPlan(f"off: {why}")
    linears = [m for m in model.modules()
               if m.__class__ is torch.nn.Linear and type(m.weight) is torch.nn.Parameter
               and m.weight.device.type == "cpu" and m.weight.dim() == 2
               and m.weight.is_contiguous()
               and m.weight.dtype in (torch.float32, torch.bfloat16)
               and (m.bias is None or m.bias.dtype == m.weight.dtype)
               and packed_forward(m) is None]
    if not linears:
        return PackPlan("off: no plain float32/bfloat16 nn.Linear (quantized or offloaded)")
    refused = {dt: why for dt in {m.weight.dtype for m in linears}
               if (why := dtype_unavailable(dt)) is not None}
    linears = [m for m in linears if m.weight.dtype not in refused]
    if not linears:
        return PackPlan("off: " + "; ".join(refused.values()))
    started = time.perf_counter()
    groups: dict[tuple[int, int, Any], list[Any]] = {}
    for m in linears:
        groups.setdefault((int(m.weight.shape[0]), int(m.weight.shape[1]), m.weight.dtype),
                          []).append(m)
    plan = PackPlan("measured", max_bytes=max_bytes)
    for (n, k, dtype), mods in sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        ms = {rows: _measured(home, n, k, rows, dtype) for rows in ROWS}
        plan.shapes.append(ShapePack((n, k), str(dtype).removeprefix("torch."), len(mods), ms,
                                     choose_min_rows(ms)))
    left = max_bytes
    for shape in sorted(plan.shapes, key=lambda s: -s.saving_ms()):
        if shape.min_rows is None:
            continue
        if shape.bytes > left:
            shape.why = f"over the packed_linear_mb bound ({max_bytes / 2**20:.0f} MiB)"
            continue
        left -= shape.bytes
        shape.packed = True
        dtype = getattr(torch, shape.dtype)
        for m in groups[(shape.shape[0], shape.shape[1], dtype)]:
            m.forward = PackedForward(m, pack(m.weight), shape.min_rows)
    plan.fused_gelu = fuse_gelu(model)
    plan.seconds = time.perf_counter() - started
    log.info("%s", plan.describe())
    return plan
