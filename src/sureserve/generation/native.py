"""sureserve's GEMV kernel for decode steps (``gemv.c``): built here, used where it measured
faster, with the reason in ``/info`` wherever it is not.

Why: a decode step at a few rows is bound by how fast the weights stream from memory, and
torch's CPU GEMM reads a skinny product's weights far below the memory's speed on some
CPUs (an AMD EPYC: ~11 GB/s through ``F.linear`` where a plain FMA loop over the same
row-major weight reads ~25 GB/s; BENCHMARKS.md "Generation: a GEMV kernel for the decode
step"). The kernel is ~500 lines of C compiled once per machine with ``-march=native``
(AVX-512, AVX2 or plain C, whichever this CPU has) and kept under
``<home>/kernels/``; loading it needs a C compiler the first time (``cc``, or ``$CC``).
It reads float32 weights and int8 weight-only ones (``loading/kernels.py``'s
``Int8WeightOnlyLinear``: int8 rows with one float32 scale each, widened in registers, the
activations kept in float32), and runs either one product (``Gemv.__call__``,
``Gemv.linear``), the fused parts of a Llama layer, or a whole decode step in one call
(``Gemv.decode``: every layer, the attention over the KV cache, lm_head; BENCHMARKS.md
"Generation: one call per decode step, int8 weights").

Float32 weights may also be repacked into panels (``Panels``, ``gemv.c``: one forward
stream per product at any row count, tiles of several rows per loaded vector), a second
copy bounded by ``decode_panels_mb``, read from the row count where they measured no
slower than the row-major weights.

It is chosen by measurement, never by CPU flags: every distinct weight shape of the model
(float32, or int8 against torch's int8 matmul) is timed through torch and through the
kernel (row-major and panels) at the row counts of ``ROWS`` (cached per machine, beside
the matmul speeds); where the kernel takes whole steps, timed whole steps then decide the
row counts it serves (``direct.calibrate_steps``), elsewhere the matmuls' sum does. Its
sums run in another order than torch's, so logits can differ in
the last bits: greedy outputs are compared with ``transformers`` generation in the tests
(a difference is allowed only at a near-tie) and by ``sureserve bench generate``;
``decode_kernel = false`` keeps torch's kernels, and the direct step's bit-identity with
the model's forward.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sureserve.loading import cbuild
from sureserve.loading.packed import PackedForward, packed_forward, tensor_version

log = logging.getLogger("sureserve.generation")

SOURCE = Path(__file__).with_name("gemv.c")
#: row counts the kernel is measured at; it serves up to the largest one where it wins
#: (32: a full decode batch of the default max_running_seqs)
ROWS = (1, 4, 8, 16, 32)
#: row counts a prompt's products (the prefill's) are measured at: a short chat's prompt,
#: and a prefill group (``prefill_group_tokens``)
PROMPT_ROWS = (32, 128)
#: a weight shape goes through the kernel at a row count where it beat F.linear by this
#: much (noise margin)
MIN_GAIN = 1.05
#: a step of this many rows takes the kernel's path (the Python layer loop) when its
#: matmuls, each shape through the faster kernel, beat torch's by this much: the margin
#: pays for the Python loop that replaces the TorchScript one (~2 ms a step, BENCHMARKS.md);
#: a quantized model, which has no TorchScript loop to leave, needs only MIN_GAIN
STEP_GAIN = 1.2
#: bytes of weight copies a shape is timed over (a decode step streams the whole model, so
#: the timing must not run from the caches)
STREAM_BYTES = 64 * 2**20

_LOCK = threading.Lock()
_BUILT: dict[str, tuple[Gemv | None, str]] = {}
#: the attention keeps one head's sums on the stack (gemv.c ``attend``)
MAX_HEAD_DIM = 512


class Linear(ctypes.Structure):
    """A linear layer as ``gemv.c`` reads it (``sureserve_linear``): float32 weights, or
    int8 weights with one float32 scale per output row; float32 ones may carry their
    panels (``p``, read by products of at least ``pmin`` rows); int8 ones from ``pmin``
    rows (0: never) widen each panel of columns to float32 as the product goes; the
    tensors must outlive it."""

    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int), ("k", ctypes.c_int), ("p", ctypes.c_void_p),
                ("pmin", ctypes.c_int)]


#: where a module's panels are kept (``Panels``), in its ``__dict__``
PANELS = "_sureserve_panels"
#: where an int8 weight-only module keeps from how many rows its products widen panels
#: as they go (``KernelPlan.widen_rows``), in its ``__dict__``
WIDEN = "_sureserve_widen_rows"


def widen_of(module: Any) -> int:
    """From how many rows ``module``'s int8 products widen panels as they go (0: never)."""
    return int(module.__dict__.get(WIDEN, 0))


class Panels:
    """A float32 linear layer's weight in the kernel's panel layout (``gemv.c``: products
    of ``min_rows`` rows or more read it), held on the module. Used only while the weight is
    still the one it was made from (same storage, version and dtype: a weight changed in
    place or swapped runs the row-major path, never a stale copy). A deep copy or a pickle
    of the module carries none (a copy would double the memory for a weight it no longer
    matches)."""

    def __init__(self, weight: Any, panels: Any, min_rows: int) -> None:
        self.panels, self.min_rows = panels, min_rows
        self.key = None if weight is None else _identity(weight)

    def fresh(self, weight: Any) -> bool:
        return self.panels is not None and self.key == _identity(weight)

    def __deepcopy__(self, memo: dict[int, Any]) -> Panels:
        return Panels(None, None, self.min_rows)

    def __getstate__(self) -> dict[str, Any]:
        return {"min_rows": self.min_rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(None, None, state["min_rows"])  # type: ignore[misc]


def _identity(weight: Any) -> tuple[Any, ...]:
    return (weight.data_ptr(), tensor_version(weight), weight.dtype, tuple(weight.shape))


def panels_of(module: Any) -> Panels | None:
    """``module``'s panels when it has fresh ones (a float32 ``nn.Linear`` given them by
    ``plan``)."""
    got = module.__dict__.get(PANELS)
    if not isinstance(got, Panels):
        return None
    w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return got if w is not None and got.fresh(w) else None


LAYER_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class Layer(ctypes.Structure):
    """One decoder layer's weights (``sureserve_layer``)."""

    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p),
                *((name, Linear) for name in LAYER_LINEARS)]


def weights_of(module: Any) -> tuple[Any, Any, Any] | None:
    """(weight, scale, bias) the kernel reads for a linear layer: a plain ``nn.Linear`` in
    float32 (scale None), or an int8 weight-only layer (``loading/kernels.py``: int8
    weight, one float32 scale per output row); None for anything else (another dtype, a
    non-contiguous weight, another quantization)."""
    import torch

    f32 = torch.float32
    w: Any
    if module.__class__ is torch.nn.Linear:
        w, b = module._parameters["weight"], module._parameters["bias"]
        scale = None
        if w is None or w.dtype != f32:
            return None
    elif module.__class__.__name__ == "Int8WeightOnlyLinear" and \
            module.__class__.__module__ == "sureserve.loading.kernels":
        w, scale, b = module._buffers["weight_int8"], module._buffers["scale"], module.bias
        if w.dtype != torch.int8 or scale.dtype != f32 or not scale.is_contiguous():
            return None
    else:
        return None
    return (w, scale, b) if _readable(w, b) else None


def _readable(weight: Any, bias: Any) -> bool:
    """A CPU weight, 2-D and row-major contiguous (nn.Linear's own layout), and a float32
    contiguous bias or none: what every entry point reads, whatever the weight's dtype."""
    import torch

    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))


def struct_of(weights: tuple[Any, Any, Any], panels: Panels | None = None,
              widen: int = 0) -> Linear:
    """``weights_of``'s (weight, scale, bias) as a ``Linear``, with the weight's panels
    when given (float32 weights); int8 weights widen panels as they go from ``widen`` rows
    (0: never)."""
    w, scale, b = weights
    p = panels if panels is not None and scale is None else None
    pmin = p.min_rows if p is not None else (widen if scale is not None else 0)
    return Linear(w.data_ptr(), _ptr(scale), _ptr(b), int(w.shape[0]), int(w.shape[1]),
                  None if p is None else _ptr(p.panels), pmin)


def linear_struct(module: Any) -> Linear | None:
    """``module``'s weights as a ``Linear``, with its panels where it has fresh ones, or
    for int8 weights the row count its products widen panels from (None: not a layer the
    kernel reads)."""
    got = weights_of(module)
    return None if got is None else struct_of(got, panels_of(module), widen_of(module))


def shape_key(weight: Any) -> tuple[Any, ...]:
    """The key a weight's measurement is kept under: (out, in) for float32, (out, in,
    "int8") for int8 weights."""
    n, k = int(weight.shape[0]), int(weight.shape[1])
    return (n, k) if str(weight.dtype) == "torch.float32" else (n, k, "int8")


class Gemv:
    """The loaded kernel: ``gemv(x, weight, bias)`` is ``F.linear`` for contiguous float32
    CPU tensors (``accepts`` says whether it can take them)."""

    def __init__(self, lib: ctypes.CDLL, key: str) -> None:
        self.key = key
        P, N, Fl = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        # ctypes releases the GIL for each call
        LP = ctypes.POINTER(Linear)
        self._fn = _bind(lib.sureserve_gemv, [P, P, P, P, N, N, N])
        self._qkv = _bind(lib.sureserve_norm_gemv3, [P, P, Fl, P, N, LP, LP, LP, P, P, P, N])
        self._mlp = _bind(lib.sureserve_mlp, [P, P, Fl, LP, LP, LP, P, P, P, N])
        self._linear = _bind(lib.sureserve_linear_apply, [P, LP, P, P, N])
        self._pack = _bind(lib.sureserve_pack_panels, [P, P, N, N])
        width = lib.sureserve_panel_width
        width.restype = ctypes.c_int
        #: output columns per panel (0: this build has no vector unit, hence no panels)
        self.panel_width: int = int(width())
        Lg = ctypes.c_long
        self._decode = _bind(lib.sureserve_decode,
                             [P, N, N, ctypes.POINTER(Layer), N, Fl, P, P, N, N, N, Fl, P, P,
                              Lg, Lg, Lg, N, N, P, P, P, ctypes.POINTER(Linear), P])
        isa = lib.sureserve_gemv_isa
        isa.restype = ctypes.c_char_p
        self.isa: str = isa().decode()

    def pack_panels(self, weight: Any) -> Any:
        """``weight`` (float32 (n, k), row-major contiguous) in panels: a flat float32
        tensor of ceil(n / panel_width) * panel_width * k (the last panel zero-padded)."""
        import torch

        n, k = int(weight.shape[0]), int(weight.shape[1])
        width = self.panel_width
        assert width > 0 and weight.dtype == torch.float32 and weight.is_contiguous()
        p = torch.empty(-(-n // width) * width * k, dtype=torch.float32)
        self._pack(weight.data_ptr(), p.data_ptr(), n, k)
        return p

    @staticmethod
    def accepts(x: Any, weight: Any, bias: Any) -> bool:
        import torch

        return (x.dtype == torch.float32 and x.device.type == "cpu"
                and x.shape[-1] == weight.shape[1] and Gemv.takes_weight(weight, bias))

    @staticmethod
    def takes_weight(weight: Any, bias: Any) -> bool:
        """A float32 CPU weight, row-major contiguous (nn.Linear's own layout), and a
        float32 contiguous bias or none."""
        import torch

        return weight.dtype == torch.float32 and _readable(weight, bias)

    def __call__(self, x: Any, weight: Any, bias: Any = None) -> Any:
        import torch

        x = x.contiguous()
        k, n = weight.shape[1], weight.shape[0]
        y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
        self._fn(x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), x.numel() // k,
                 n, k)
        return y

    def linear(self, x: Any, layer: Linear, residual: Any = None) -> Any:
        """``F.linear`` for a layer of either kind (``Linear``: float32 or int8 weights),
        plus ``residual`` when given; x contiguous float32 ``(..., layer.k)``."""
        import torch

        x = x.contiguous()
        residual = residual.contiguous() if residual is not None else None
        y = torch.empty(*x.shape[:-1], layer.n, dtype=torch.float32)
        self._linear(x.data_ptr(), ctypes.byref(layer), _ptr(residual), y.data_ptr(),
                     x.numel() // layer.k)
        return y

    def decode(self, x: Any, layers: Any, eps: float, rotary: tuple[Any, Any], heads: int,
               kv_heads: int, scaling: float, kv: Any, mask: Any, scratch: Any,
               final_norm: Any = None, head: Linear | None = None) -> Any:
        """One decode step over every layer (``sureserve_decode``), in place on ``x``
        (rows, hidden) float32 contiguous: this step's keys and values written into ``kv``
        (a float32 contiguous ``PaddedKV``) at column ``kv.end``; ``mask`` (rows, width + 1)
        bool or None; ``scratch`` float32 of at least ``scratch_size``. Returns the logits
        (rows, vocab) when ``head`` is given (after ``final_norm``), else None."""
        import torch

        cos, sin = rotary
        rows, hidden = x.shape
        k, v = kv.k, kv.v
        logits = None if head is None else torch.empty(rows, head.n, dtype=torch.float32)
        self._decode(x.data_ptr(), rows, hidden, layers, len(layers), eps, cos.data_ptr(),
                     sin.data_ptr(), cos.shape[-1], heads, kv_heads, scaling, k.data_ptr(),
                     v.data_ptr(), k.stride(0), k.stride(1), k.stride(2), kv.start, kv.end,
                     _ptr(mask), scratch.data_ptr(), _ptr(final_norm),
                     None if head is None else ctypes.byref(head), _ptr(logits))
        return logits

    @staticmethod
    def scratch_size(rows: int, hidden: int, layer: Layer, heads: int, d: int) -> int:
        """Floats of scratch ``decode`` needs for ``rows`` rows."""
        nq = heads * d
        return rows * (hidden + layer.q.n + layer.k.n + layer.v.n + nq + 2 * layer.gate.n)

    # The fused calls of one Llama decoder layer (``DirectDecode``'s kernel path): fewer,
    # larger calls, so that the small operations between the matmuls (RMSNorm, the bias,
    # SiLU, the residual adds) stop costing a Python call each. Inputs: contiguous float32
    # (rows, 1, width) activations; the caller checked the weights with ``accepts``.

    def norm_qkv(self, x: Any, norm_weight: Any, eps: float, linears: list[Linear],
                 rotary: tuple[Any, Any] | None = None) -> Any:
        """``cat([layer(rms_norm(x)) for layer in linears], -1)`` for three float32 linear
        layers of the same input width (q, k and v); with ``rotary`` = (cos, sin), each
        ``(rows, head_dim)`` float32 contiguous, the rotary embedding is applied to the
        first two's heads (q and k), as ``apply_rotary_pos_emb`` does."""
        import torch

        q, k, v = linears
        cos, sin = rotary if rotary is not None else (None, None)
        x = x.contiguous()
        rows = x.numel() // q.k
        h = torch.empty(rows, q.k, dtype=torch.float32)
        y = torch.empty(*x.shape[:-1], q.n + k.n + v.n, dtype=torch.float32)
        self._qkv(x.data_ptr(), norm_weight.data_ptr(), eps, h.data_ptr(), rows,
                  ctypes.byref(q), ctypes.byref(k), ctypes.byref(v), y.data_ptr(), _ptr(cos),
                  _ptr(sin), 0 if cos is None else cos.shape[-1])
        return y

    def mlp(self, x: Any, norm_weight: Any, eps: float, gate: Linear, up: Linear,
            down: Linear) -> Any:
        """``x + down(silu(gate(h)) * up(h))`` with ``h = rms_norm(x)`` (float32 layers,
        no biases)."""
        import torch

        x = x.contiguous()
        k, f = x.shape[-1], gate.n
        rows = x.numel() // k
        h = torch.empty(rows, k, dtype=torch.float32)
        a = torch.empty(rows, 2 * f, dtype=torch.float32)
        y = torch.empty_like(x)
        self._mlp(x.data_ptr(), norm_weight.data_ptr(), eps, ctypes.byref(gate),
                  ctypes.byref(up), ctypes.byref(down), h.data_ptr(), a.data_ptr(),
                  y.data_ptr(), rows)
        return y


def _bind(fn: Any, argtypes: list[Any]) -> Any:
    fn.argtypes = argtypes
    fn.restype = None
    return fn


def _ptr(t: Any) -> int | None:
    return None if t is None else int(t.data_ptr())


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (part of a build's key; the tests read them)."""
    return cbuild.cpu_flags()


def build(home: Path | None, march: str = "native") -> tuple[Gemv | None, str]:
    """(the kernel, "") or (None, why it is unavailable); compiled once per machine and
    source (cached under ``<home>/kernels/``, ``loading/cbuild.py``), loaded once per
    process. ``march``: the instruction set compiled for (the tests build the other ones
    too)."""
    import torch  # noqa: F401  first: the kernel's libgomp must resolve to torch's

    cc, version, why = cbuild.compiler()
    if cc is None:
        return None, why
    key = cbuild.build_key(SOURCE, version, march)
    with _LOCK:
        if key in _BUILT:
            return _BUILT[key]
        got: tuple[Gemv | None, str]
        try:
            so = cbuild.compiled(SOURCE, home, cc, key, march)
            got = (Gemv(ctypes.CDLL(str(so)), key), "")
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            log.warning("decode GEMV kernel unavailable: %s", exc)
            got = (None, f"it could not be built or loaded ({exc})")
        _BUILT[key] = got
        return got


@dataclass
class KernelPlan:
    """Whether decode steps use the kernel, up to how many rows, and the measurement."""

    kernel: Gemv | None
    max_rows: int  # steps of at most this many rows take the kernel's path
    reason: str  # why it is not used ("" when it is)
    # rows -> (F.linear ms, ms with each shape through the faster of the two), summed over
    # one decode step's matmuls
    step_ms: dict[int, tuple[float, float]] = field(default_factory=dict)
    # ``shape_key`` of a weight ((out, in), or (out, in, "int8")) -> the most rows at which
    # the kernel beat torch's kernel for it (F.linear, or torch's int8 matmul)
    shape_rows: dict[tuple[Any, ...], int] = field(default_factory=dict)
    # float32 (out, in) -> from how many rows its weights are read in panels (shapes given
    # panels only), the MiB of panels made, and why a shape that gains from them has none
    panel_rows: dict[tuple[Any, ...], int] = field(default_factory=dict)
    panel_mb: float = 0.0
    panel_why: str = ""
    # rows -> (torch's path ms, the kernel's ms) for whole decode steps of this model
    # (``direct.calibrate_steps``): when measured, what ``max_rows`` was chosen by
    whole_ms: dict[int, tuple[float, float]] = field(default_factory=dict)
    # float32 shape with panels -> PROMPT_ROWS -> (torch's ms: the packed product where it
    # runs, else F.linear; the panels' ms); int8 shape -> PROMPT_ROWS -> (the int8 layer's
    # own forward ms, the kernel's int8 product ms). The shapes that won at every one of
    # them go through the kernel in prompts' forwards too (``prompt_shapes``,
    # ``prompt_panels``)
    prompt_ms: dict[tuple[Any, ...], dict[int, tuple[float, float]]] = \
        field(default_factory=dict)
    # int8 (out, in, "int8") -> from how many rows of a decode step its products widen
    # each panel of columns to float32 as they go (measured no slower than the row-major
    # int8 product from there on; no copy is kept)
    widen_rows: dict[tuple[Any, ...], int] = field(default_factory=dict)

    @property
    def prompt_shapes(self) -> list[tuple[Any, ...]]:
        return [key for key, ms in self.prompt_ms.items()
                if (len(key) > 2 or key in self.panel_rows)
                and all(c < a for a, c in ms.values())]

    def active(self, rows: int) -> bool:
        return self.kernel is not None and rows <= self.max_rows

    def takes(self, weight: Any, rows: int) -> bool:
        """Whether a ``weight`` (float32, or int8 weight-only) times ``rows`` rows goes
        through the kernel."""
        return rows <= self.shape_rows.get(shape_key(weight), 0)

    def describe(self) -> str:
        if self.kernel is None or self.max_rows == 0:
            return f"torch's matmul kernels ({self.reason})"
        figures = self.whole_ms or self.step_ms
        what = "whole steps" if self.whole_ms else "matmuls"
        one = figures.get(1)
        gain = f", {what} {one[0] / max(one[1], 1e-9):.2f}x faster at 1 row" if one else ""
        top = figures.get(self.max_rows)
        if top and self.max_rows != 1:
            gain += f", {top[0] / max(top[1], 1e-9):.2f}x at {self.max_rows}"
        panels = ""
        if self.panel_rows:
            lo = min(self.panel_rows.values())
            panels = (f"; float32 weights in panels ({self.panel_mb:.0f} MiB) from "
                      f"{lo} row{'s' if lo > 1 else ''}")
        if self.panel_why:
            panels += f"; {self.panel_why}"
        if self.widen_rows:
            lo = min(self.widen_rows.values())
            panels += (f"; int8 weights widened into panels as products go, from {lo} "
                       f"row{'s' if lo > 1 else ''} ({len(self.widen_rows)} shapes)")
        panels += self._describe_prompts()
        return (f"sureserve's GEMV kernel ({self.kernel.isa}) for steps of up to "
                f"{self.max_rows} rows{gain}{panels}")

    def _describe_prompts(self) -> str:
        out = ""
        for int8 in (False, True):
            measured = [key for key in self.prompt_ms if (len(key) > 2) == int8]
            if not measured:
                continue
            took = [key for key in self.prompt_shapes if key in measured]
            what = "int8 prompts' products" if int8 else "prompts' products"
            if not took:
                out += (f"; {what} through torch's (the "
                        f"{'int8 product' if int8 else 'panels'} measured no faster)")
                continue
            gains = []
            for rows in PROMPT_ROWS:
                a = sum(self.prompt_ms[key][rows][0] for key in took)
                c = sum(self.prompt_ms[key][rows][1] for key in took)
                gains.append(f"{a / max(c, 1e-9):.2f}x at {rows}")
            how = "through the kernel too" if int8 else "read the panels too"
            out += (f"; {what} {how} ({len(took)} of {len(measured)} shapes, "
                    f"{', '.join(gains)} rows)")
        return out

    def to_dict(self) -> dict[str, Any]:
        def name(key: tuple[Any, ...]) -> str:
            return "x".join(map(str, key[:2])) + "".join(f":{t}" for t in key[2:])

        return {"kernel": None if self.kernel is None else self.kernel.isa,
                "max_rows": self.max_rows,
                "reason": self.reason,
                "shape_rows": {name(key): r for key, r in self.shape_rows.items()},
                "step_ms": {str(r): [round(a, 3), round(b, 3)]
                            for r, (a, b) in self.step_ms.items()},
                "panel_rows": {name(key): r for key, r in self.panel_rows.items()},
                "panel_mb": round(self.panel_mb, 1),
                "panel_why": self.panel_why,
                "whole_step_ms": {str(r): [round(a, 3), round(b, 3)]
                                  for r, (a, b) in self.whole_ms.items()},
                "prompt_ms": {name(key): {str(r): [round(a, 6), round(c, 6)]
                                          for r, (a, c) in ms.items()}
                              for key, ms in self.prompt_ms.items()},
                "prompt_shapes": [name(key) for key in self.prompt_shapes],
                "widen_rows": {name(key): r for key, r in self.widen_rows.items()}}


def plan(model: Any, device: str, home: Path | None, enabled: bool = True,
         packing: Any = None, panel_bytes: int = 0) -> KernelPlan:
    """Build the kernel and measure it against ``F.linear`` on ``model``'s weight shapes
    (cached per machine); the plan says up to how many rows it runs, or why it does not.
    ``packing``: a ``loading.packed.PackPlan``; where it runs a float32 shape packed at a
    row count, the kernel is weighed against the packed product's time instead.
    ``panel_bytes``: the most bytes of panel copies to make (``decode_panels_mb``): a
    float32 shape whose panels measured no slower than its row-major weights from some row
    count on gets them (the shapes that save the most first), and the model's layers of
    that shape hold them (``Panels``) when the kernel is used at all."""

    if not enabled:
        return KernelPlan(None, 0, "decode_kernel is off")
    if not str(device).startswith("cpu"):
        return KernelPlan(None, 0, "not a CPU")
    shapes: dict[tuple[Any, ...], int] = {}
    for m in model.modules():
        got = weights_of(m)
        if got is not None:
            key = shape_key(got[0])
            shapes[key] = shapes.get(key, 0) + 1
            if len(key) > 2:  # measured in float32 too (counted for nothing in the step's
                # figures): ``sureserve quantize`` may swap the layer back to float32
                shapes.setdefault(key[:2], 0)
    if not shapes:
        return KernelPlan(None, 0, "no linear layer the kernel reads (float32 nn.Linear or "
                                   "int8 weight-only): another dtype or quantization")
    kernel, why = build(home)
    if kernel is None:
        return KernelPlan(None, 0, why)
    # shape -> rows -> (torch's ms, the kernel's row-major ms, its panels' ms or None)
    got_ms = {key: {rows: _measured(home, kernel, key, rows) for rows in ROWS}
              for key in shapes}
    panel_rows, panel_why = _panel_plan(shapes, got_ms, panel_bytes, kernel.panel_width)
    widen_rows = _widen_plan(shapes, got_ms)
    step: dict[int, tuple[float, float]] = {}
    shape_rows: dict[tuple[Any, ...], int] = dict.fromkeys(shapes, 0)
    for rows in ROWS:
        torch_ms = best_ms = 0.0
        for key, count in shapes.items():
            a, b, c = got_ms[key][rows]
            if c is not None and rows >= (widen_rows if len(key) > 2 else panel_rows).get(
                    key, rows + 1):
                b = c
            other = packing.packed_ms((key[0], key[1]), "float32", rows) \
                if packing is not None and len(key) == 2 else None
            if other is not None:
                a = min(a, other)
            # a shape keeps the kernel for the longest run of row counts, from one, where
            # it won (a win at 16 rows after a loss at 8 is noise, not a regime)
            before = ROWS[ROWS.index(rows) - 1] if rows != ROWS[0] else 0
            wins = a >= b * MIN_GAIN and shape_rows[key] == before
            if wins:
                shape_rows[key] = rows
            torch_ms, best_ms = torch_ms + a * count, best_ms + (b if wins else a) * count
        step[rows] = (torch_ms, best_ms)
    # the margin pays for leaving TorchScript's layer loop; a model with a layer that is not
    # a plain nn.Linear (int8 weight-only) runs the Python loop without the kernel anyway,
    # and the kernel's one-call step only removes it: there the noise margin is enough
    # (an int8 model's 4- and 8-row steps measured 1.18x and 1.30x, and ran the Python loop)
    quantized = any(len(key) > 2 and count for key, count in shapes.items())
    margin = MIN_GAIN if quantized else STEP_GAIN
    max_rows = 0
    for rows in ROWS:  # the longest run of row counts, from one, where the step gains
        if step[rows][0] < step[rows][1] * margin:
            break
        max_rows = rows
    against = "F.linear" if packing is None or packing.min_rows() is None \
        else "oneDNN's packed linears"
    reason = "" if max_rows else (
        f"no faster than {against} here ({step[1][1]:.2f} vs {step[1][0]:.2f} ms of matmuls "
        "a step at 1 row)")
    # given now: the whole steps that decide the row counts read them
    # (``direct.calibrate_steps``); ``drop_panels`` where the kernel ends up unused
    made = _give_panels(model, kernel, panel_rows) if panel_rows else 0
    _give_widen(model, widen_rows)
    out = KernelPlan(kernel, max_rows, reason, step, shape_rows, panel_rows, made / 2**20,
                     panel_why, widen_rows=widen_rows)
    int8 = [key for key, count in shapes.items() if len(key) > 2 and count]
    if made or int8:
        out.prompt_ms = _prompt_plan(home, kernel, panel_rows if made else {}, got_ms,
                                     packing, int8)
    log.info("decode matmuls: %s", out.describe())
    return out


def _panel_plan(shapes: dict[tuple[Any, ...], int],
                got_ms: dict[tuple[Any, ...], dict[int, tuple[float, float, float | None]]],
                max_bytes: int, width: int) -> tuple[dict[tuple[Any, ...], int], str]:
    """(float32 shape -> from how many rows it reads panels, why a shape that would gain
    has none). A shape reads panels from the smallest row count from which they measured
    no slower than its row-major weights (within the noise margin) at every larger one:
    the same panels at every row count keep a row's logits independent of how many rows
    ran with it. Shapes go in order of the time they save a step at the most rows, within
    ``max_bytes``; ``width``: the kernel's panel width (0: none)."""
    if not width:
        return {}, ""
    want: dict[tuple[Any, ...], int] = {}
    saved: dict[tuple[Any, ...], float] = {}
    for key, count in shapes.items():
        if len(key) > 2 or not count:
            continue
        start = _wins_from(got_ms[key])
        if start is not None:
            _, b, c = got_ms[key][ROWS[-1]]
            want[key], saved[key] = start, (b - (c or 0.0)) * count
    if not want:
        return {}, ""
    out: dict[tuple[Any, ...], int] = {}
    left, over = max_bytes, []
    for key in sorted(want, key=lambda k: -saved[k]):
        size = -(-int(key[0]) // width) * width * int(key[1]) * 4 * shapes[key]
        if size <= left:
            out[key] = want[key]
            left -= size
        else:
            over.append("x".join(map(str, key)))
    why = "" if not over else (
        "off (decode_panels_mb is 0)" if max_bytes <= 0 else
        f"no panels for {', '.join(over)}: over the decode_panels_mb bound "
        f"({max_bytes / 2**20:.0f} MiB)")
    return out, why


def _wins_from(ms: dict[int, tuple[float, float, float | None]]) -> int | None:
    """The smallest of ``ROWS`` from which the third figure (panels, or widened panels)
    measured no slower than the second (the row-major product) within the noise margin at
    every larger row count; None: not even at the most rows."""
    start = None
    for rows in reversed(ROWS):
        _, b, c = ms[rows]
        if c is None or c > b * MIN_GAIN:
            break
        start = rows
    return start


def _widen_plan(shapes: dict[tuple[Any, ...], int],
                got_ms: dict[tuple[Any, ...], dict[int, tuple[float, float, float | None]]]
                ) -> dict[tuple[Any, ...], int]:
    """int8 shape -> the smallest row count from which widening panels as the product
    goes measured no slower than the row-major int8 product (within the noise margin) at
    every larger one (as ``_panel_plan`` chooses for float32 panels, but nothing is kept:
    no memory bound)."""
    out: dict[tuple[Any, ...], int] = {}
    for key, count in shapes.items():
        if len(key) <= 2 or not count:
            continue
        start = _wins_from(got_ms[key])
        if start is not None:
            out[key] = start
    return out


def _give_widen(model: Any, widen_rows: dict[tuple[Any, ...], int]) -> None:
    """Mark every int8 weight-only layer of a ``widen_rows`` shape with its row count (the
    structures the decode step builds read it: ``widen_of``)."""
    for m in model.modules():
        got = weights_of(m)
        if got is not None and got[1] is not None:
            rows = widen_rows.get(shape_key(got[0]))
            if rows is None:
                m.__dict__.pop(WIDEN, None)
            else:
                m.__dict__[WIDEN] = rows


def _prompt_plan(home: Path | None, kernel: Gemv, panel_rows: dict[tuple[Any, ...], int],
                 got_ms: dict[tuple[Any, ...], dict[int, tuple[float, float, float | None]]],
                 packing: Any, int8: Sequence[tuple[Any, ...]] = ()
                 ) -> dict[tuple[Any, ...], dict[int, tuple[float, float]]]:
    """Each shape with panels at ``PROMPT_ROWS``: (torch's ms, the panels' ms), torch's
    being the packed product where it runs at that row count, else ``F.linear``; each
    ``int8`` shape: (the int8 layer's own forward ms, the kernel's int8 product ms). Cached
    per machine like the decode row counts."""
    out: dict[tuple[Any, ...], dict[int, tuple[float, float]]] = {}
    for key in [*panel_rows, *int8]:
        ms: dict[int, tuple[float, float]] = {}
        for rows in PROMPT_ROWS:
            # (int8: c is the product that widens panels as it goes)
            a, _, c = got_ms[key].get(rows) or _measured(home, kernel, key, rows)
            if c is None:
                break
            other = packing.packed_ms((key[0], key[1]), "float32", rows) \
                if packing is not None and len(key) == 2 else None
            ms[rows] = (a if other is None else min(a, other), c)
        else:
            out[key] = ms
    return out


_PROMPT = threading.local()


@contextmanager
def prompt_panels() -> Iterator[None]:
    """Within it, this thread's forwards read the panels of the layers that have
    ``PromptPanels`` (the generation engine's prefill: a prompt's products are tens to
    hundreds of rows, where the panels measured faster than oneDNN's packed GEMM and
    ``F.linear``). Any other caller of the model, and every other thread, runs the layers
    as before: ``transformers``' own forward, for one, stays the reference it is in tests."""
    before = getattr(_PROMPT, "on", False)
    _PROMPT.on = True
    try:
        yield
    finally:
        _PROMPT.on = before


#: ``PromptPanels.min_rows`` of a layer that is not packed (its packed path never runs)
_NEVER = 1 << 62


class PromptPanels(PackedForward):
    """A float32 ``nn.Linear``'s instance ``forward`` that, inside ``prompt_panels`` on this
    thread, reads the layer's panels at any row count (the same panels at every row count:
    a prompt's keys and values do not depend on how it was split into chunks or groups),
    and is otherwise exactly the layer's ``PackedForward`` (its packed copy and row bound,
    ``F.linear`` where it had none). It is a ``PackedForward`` so that whoever reads the
    packed copy (the direct decode step, ``copy_packed``) still finds it; a deep copy or a
    pickle is a plain ``PackedForward`` of the copy (which has no panels)."""

    def __init__(self, module: Any, kernel: Gemv, inner: PackedForward | None) -> None:
        super().__init__(module, None, _NEVER)
        if inner is not None:  # its packed path as it was (checked fresh by the caller)
            self.packed, self.min_rows = inner.packed, inner.min_rows
            self.ptr, self.version, self.dtype = inner.ptr, inner.version, inner.dtype
        self.inner = inner  # what ``undo`` puts back
        self.kernel = kernel
        self._key: tuple[Any, ...] | None = None
        self._struct: Linear | None = None

    def __call__(self, x: Any) -> Any:
        if getattr(_PROMPT, "on", False):
            y = self._through_panels(x)
            if y is not None:
                return y
        return super().__call__(x)

    def _through_panels(self, x: Any) -> Any:
        import torch

        m = self.module
        panels = panels_of(m)  # fresh ones only: a weight changed since runs as before
        got = weights_of(m) if panels is not None else None
        if got is None or got[1] is not None or not Gemv.accepts(x, got[0], got[2]) \
                or (torch.is_grad_enabled() and (x.requires_grad or got[0].requires_grad)):
            return None
        w, _, b = got
        key = (id(panels), w.data_ptr(), None if b is None else b.data_ptr())
        if key != self._key or self._struct is None:
            self._struct = struct_of(got, panels)
            self._struct.pmin = 1  # every row count: one rounding for a prompt's rows
            self._key = key
        return self.kernel.linear(x, self._struct)

    def undo(self) -> None:
        """The layer's forward as it was: the ``PackedForward`` this stands in for, or its
        class's where it had none."""
        if self.inner is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.inner

    def __reduce__(self) -> tuple[Any, ...]:
        return (PackedForward, (self.module, None, self.min_rows))


class PromptInt8:
    """An int8 weight-only layer's instance ``forward``: inside ``prompt_panels`` on this
    thread, the kernel's int8 product (each panel of columns widened to float32 once per
    product and read by every tile of rows; the activations not rounded, where torch's
    int8 matmul rounds them to bf16 on CPUs that measured that faster), measured faster
    than the layer's own forward at prompt-sized row counts; at every row count, so that a
    prompt's rows do not depend on how it was chunked. Otherwise exactly the layer's own
    forward. A copy
    or a pickle carries one without the kernel (the layer's own forward)."""

    def __init__(self, module: Any, kernel: Gemv | None) -> None:
        self.module, self.kernel = module, kernel
        self._key: tuple[Any, ...] | None = None
        self._struct: Linear | None = None

    def __call__(self, x: Any) -> Any:
        if self.kernel is not None and getattr(_PROMPT, "on", False):
            y = self._through_kernel(x)
            if y is not None:
                return y
        return type(self.module).forward(self.module, x)

    def _through_kernel(self, x: Any) -> Any:
        import torch

        assert self.kernel is not None
        got = weights_of(self.module)
        if got is None or got[1] is None or x.dtype != torch.float32 \
                or x.device.type != "cpu" or x.shape[-1] != got[0].shape[1] \
                or (torch.is_grad_enabled() and x.requires_grad):
            return None
        key = tuple(None if t is None else t.data_ptr() for t in got)
        if key != self._key or self._struct is None:
            self._struct, self._key = struct_of(got), key
            self._struct.pmin = 1  # every row count: one rounding for a prompt's rows
        return self.kernel.linear(x, self._struct)

    def undo(self) -> None:
        self.module.__dict__.pop("forward", None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (PromptInt8, (self.module, None))


def give_prompt_panels(model: Any, kernel_plan: KernelPlan) -> int:
    """Give every layer of a ``prompt_shapes`` shape that holds panels a ``PromptPanels``
    forward (a layer whose forward is anything but its ``PackedForward`` keeps it), and
    every int8 weight-only layer of such a shape a ``PromptInt8`` one (unless it has a
    forward of its own already); returns how many. After ``direct.plan``: the panels it
    drops are not read."""
    if kernel_plan.kernel is None or not kernel_plan.prompt_shapes:
        return 0
    took = set(kernel_plan.prompt_shapes)
    count = 0
    for m in model.modules():
        got = weights_of(m)
        if got is not None and got[1] is not None and shape_key(got[0]) in took:
            fwd = m.__dict__.get("forward")
            if fwd is None:
                m.forward = PromptInt8(m, kernel_plan.kernel)
            count += fwd is None or isinstance(fwd, PromptInt8)
            continue
        if got is None or got[1] is not None or shape_key(got[0]) not in took \
                or panels_of(m) is None:
            continue
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, PromptPanels):  # another engine on the same model gave it
            count += 1
            continue
        inner = packed_forward(m)
        if (fwd is not None and inner is None) or (inner is not None and not inner.fresh()):
            continue
        m.forward = PromptPanels(m, kernel_plan.kernel, inner)
        count += 1
    return count


def _take_prompt_panels(model: Any) -> None:
    """Undo ``give_prompt_panels``: each layer's forward is its ``PackedForward`` again, or
    its class's."""
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, PromptPanels):
            fwd.undo()


def _give_panels(model: Any, kernel: Gemv, panel_rows: dict[tuple[Any, ...], int]) -> int:
    """Pack the weights of every float32 layer of a ``panel_rows`` shape into panels, held
    on the layer (``Panels``); returns the bytes made."""
    made = 0
    if not kernel.panel_width:
        return 0
    for m in model.modules():
        got = weights_of(m)
        if got is None or got[1] is not None:
            continue
        rows = panel_rows.get(shape_key(got[0]))
        if rows is None:
            continue
        have = panels_of(m)  # another engine on the same model made them: shared
        panels = have.panels if have is not None else kernel.pack_panels(got[0])
        m.__dict__[PANELS] = Panels(got[0], panels, rows)
        made += panels.numel() * 4
    return made


def drop_panels(model: Any, kernel_plan: KernelPlan) -> None:
    """Free the panels ``plan`` gave ``model``'s layers (the kernel does not serve decode
    steps); a plan that gave none leaves the model's alone (another engine on the same
    model may read them). int8 shapes keep their prompt measurement: their prompts' path
    reads no panels."""
    if not kernel_plan.panel_rows:
        return
    _take_prompt_panels(model)
    for m in model.modules():
        m.__dict__.pop(PANELS, None)
    kernel_plan.panel_rows, kernel_plan.panel_mb = {}, 0.0
    kernel_plan.prompt_ms = {k: v for k, v in kernel_plan.prompt_ms.items() if len(k) > 2}


def measure(kernel: Gemv, n: int, k: int, rows: int, int8: bool = False,
            row_major: bool = True) -> tuple[float, float | None, float | None]:
    """(torch ms, kernel ms, kernel ms through panels or None) for one ``(n, k)`` weight at
    ``rows`` rows, streamed over enough copies that they come from memory. Float32:
    ``F.linear`` against the kernel on the row-major weight and on its panels (None: this
    build has none); ``int8``: an int8 weight-only layer's own forward (torch's packed int8
    matmul) against the kernel reading the same int8 weights row-major and widening each
    panel of columns to float32 as it goes (None: no panels in this build). Without
    ``row_major`` the kernel's row-major product is not timed (None): a prompt's row
    counts only weigh the panels against torch."""
    import torch
    import torch.nn.functional as F

    from sureserve.loading.machine import best_ms

    size = 1 if int8 else 4
    # (at most 256: a tiny test model's shapes would need thousands to leave the caches)
    copies = min(256, max(1, STREAM_BYTES // (n * k * size)))
    x = torch.randn(rows, k)
    through_panels = None
    if int8:
        from sureserve.loading.kernels import Int8WeightOnlyLinear

        mods = [Int8WeightOnlyLinear(torch.nn.Linear(k, n, bias=False)) for _ in range(copies)]
        structs = [struct_of(got) for got in map(weights_of, mods) if got is not None]
        widened = [struct_of(got, widen=1) for got in map(weights_of, mods) if got is not None]

        def through_torch() -> None:
            for m in mods:
                m(x)

        def through_kernel() -> None:
            for st in structs:
                kernel.linear(x, st)

        if kernel.panel_width:
            def through_widened() -> None:
                for st in widened:
                    kernel.linear(x, st)

            through_panels = through_widened
    else:
        ws = [torch.empty(n, k).uniform_(-1, 1) for _ in range(copies)]

        def through_torch() -> None:
            for w in ws:
                F.linear(x, w)

        def through_kernel() -> None:
            for w in ws:
                kernel(x, w)

        if kernel.panel_width:
            held = [Panels(w, kernel.pack_panels(w), 1) for w in ws]
            panel_structs = [struct_of((w, None, None), p) for w, p in zip(ws, held,
                                                                           strict=True)]

            def through_panels_() -> None:
                for st in panel_structs:
                    kernel.linear(x, st)

            through_panels = through_panels_

    # alternated, best of 3 each: drift of the machine hits both
    a = b = c = float("inf")
    for _ in range(3):
        a = min(a, best_ms(through_torch, 1))
        if row_major or through_panels is None:
            b = min(b, best_ms(through_kernel, 1))
        if through_panels is not None:
            c = min(c, best_ms(through_panels, 1))
    return (a / copies, b / copies if b != float("inf") else None,
            None if through_panels is None else c / copies)


def _measured(home: Path | None, kernel: Gemv, key: tuple[Any, ...], rows: int
              ) -> tuple[float, float, float | None]:
    """``measure`` for a ``shape_key``, cached per machine, thread count and kernel build
    (``machine.measured_once``); at a row count outside ``ROWS`` (a prompt's) the
    row-major product is not timed (nothing reads it there: it reads as infinitely slow)."""
    from sureserve.loading.machine import measured_once

    def parse(v: Any) -> tuple[float, float, float | None]:
        a, b, c = v
        return (float(a), float("inf") if b is None else float(b),
                None if c is None else float(c))

    n, k, int8 = int(key[0]), int(key[1]), len(key) > 2
    # (int8 entries hold the widened panels' time too: a name of their own)
    name = f"{n}x{k}:{rows}" + (":int8-widen" if int8 else "")
    return measured_once(home, f"gemv-{kernel.key}", name,
                         lambda: list(measure(kernel, n, k, rows, int8, rows in ROWS)), parse)
