"""Precision and quantization methods: what each one is, where it runs, how it is applied.

A method is applied to a model that was loaded in full precision, by swapping its linear
layers (``apply``), or — for bitsandbytes — by ``from_pretrained`` itself (``load_kwargs``).
Either way it is a *recipe* (method + the layers kept in full precision), so a quantized
model folder stores the recipe and the original weights, and loading it re-applies the
same deterministic transformation; the gate then compares its outputs with the golden
outputs measured when it was accepted.

Methods, and why these libraries (measured, see BENCHMARKS.md "Precision and fit"):
- ``bf16``/``fp16``: plain dtypes. On CPUs without native bf16 they are far slower, so
  ``sureserve quantize`` keeps them only when they measure faster.
- ``int8-dynamic``: int8 weights (per output channel) and int8 activations quantized per
  call: torch's own dynamic quantization (fbgemm/x86 kernels, no extra dependency).
- ``int8-smooth``: int8 weights per channel and int8 activations per token, after
  SmoothQuant's per-channel smoothing measured on the calibration texts, through oneDNN's
  int8 matmul (``kernels.SmoothInt8Linear``); a text's result does not depend on its batch.
- ``int8-weight-only`` / ``int4-weight-only``: int8 (per channel) or 4-bit (per group of
  32) weights, activations in float, with torch's packed CPU matmul kernels
  (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``); these save memory and help
  memory-bound decoding, not compute-bound encoder batches.
- ``bnb-int8``/``bnb-nf4``: bitsandbytes LLM.int8 and 4-bit NF4 through transformers'
  ``BitsAndBytesConfig`` (CUDA, and bitsandbytes' CPU backend with fp32 compute).
- ``bf16-flash``: bf16 weights with flash_attention_2 (CUDA, flash_attn installed).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sureserve.errors import SettingsError

if TYPE_CHECKING:
    from sureserve.loading.plan import DeviceCaps

# Heads stay in full precision: they are small next to the body, and quantizing the
# output projection is where quantized models lose the most (bitsandbytes keeps lm_head
# too). A user can still see them in the report.
HEAD_NAMES = ("lm_head", "classifier", "score", "pooler")
INT4_GROUP = 32


@dataclass(frozen=True)
class Method:
    name: str
    tasks: tuple[str, ...]
    device: str  # "cpu" | "cuda" | "any"
    #: single linear layers can be kept in full precision (a recipe's keep list)
    layerwise: bool
    #: largest output difference the gate accepts between two runs of the same inputs
    #: (alone vs in a padded batch; re-applied recipe vs its golden outputs)
    tolerance: float
    summary: str
    dtype: str = "float32"  # the dtype of the rest of the model
    attn: str | None = None
    #: the output heads (HEAD_NAMES) are quantized too, not kept in full precision; the
    #: sensitivity search can still keep one
    heads: bool = False
    #: needs activation ranges measured on calibration texts (``Recipe.calibration``)
    calibrated: bool = False

    @property
    def swaps_layers(self) -> bool:
        """Applied after loading by swapping linear layers (``apply``), so the sensitivity
        search can swap single layers back; bitsandbytes acts inside from_pretrained."""
        return self.layerwise and self.device == "cpu"


ALL = ("embed", "classify", "generate")
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("bf16", ALL, "any", False, 3e-2, "bfloat16 weights and activations", "bfloat16"),
    Method("fp16", ALL, "any", False, 1e-2, "float16 weights and activations", "float16"),
    # activations are quantized with one scale per call, so padding rows and other texts in
    # the batch move a text's result a little: the tolerance says how much is accepted
    Method("int8-dynamic", ALL, "cpu", True, 6e-2,
           "int8 weights per channel, int8 activations per call (torch dynamic quantization)"),
    # activations scaled per token: a text's result does not depend on its batch, so it is
    # held to bf16's tolerance, not int8-dynamic's
    Method("int8-smooth", ("embed", "classify"), "cpu", True, 3e-2,
           "int8 weights per channel, int8 activations per token, smoothed per channel "
           "from the calibration texts (SmoothQuant), oneDNN's int8 matmul",
           calibrated=True),
    # activations enter these kernels in bf16 where that is measured faster (nearly
    # everywhere: kernels.activation_dtype), so they are held to bf16's tolerance
    Method("int8-weight-only", ALL, "cpu", True, 3e-2,
           "int8 weights per channel, activations rounded to bf16 in the kernel where "
           "faster (torch packed int8 matmul)"),
    # lm_head is a fifth of smollm2's weights, and a one-client decode step streams every
    # weight: with it in int8 too a step reads 135 MiB instead of 220 (measured, not
    # assumed: the heads are where quantized models lose most, so perplexity judges it)
    Method("int8-weight-only-head", ("generate",), "cpu", True, 3e-2,
           "int8-weight-only with lm_head in int8 too (per channel)", heads=True),
    Method("int4-weight-only", ("generate",), "cpu", True, 3e-2,
           f"4-bit weights in groups of {INT4_GROUP}, activations rounded to bf16 in the "
           "kernel where faster (torch int4 matmul)"),
    # bitsandbytes runs on CUDA and, since its multi-backend releases, on CPU (measured here:
    # slower than fp32 on CPU, so it is accepted there only for memory, with --min-speedup)
    Method("bnb-int8", ALL, "any", True, 6e-2, "bitsandbytes LLM.int8 (8-bit weights, "
           "outliers in 16-bit)", "float16"),
    Method("bnb-nf4", ("generate",), "any", True, 6e-2, "bitsandbytes 4-bit NF4 weights, "
           "16-bit compute on GPUs, fp32 on CPUs", "bfloat16"),
    Method("bf16-flash", ALL, "cuda", False, 3e-2, "bfloat16 with flash_attention_2",
           "bfloat16", "flash_attention_2"),
)}


RECIPE_FILE = "sureserve_quantization.json"
REPORT_FILE = "quantization_report.json"
#: a calibrated method's measured input ranges (per linear layer, per channel)
CALIBRATION_FILE = "sureserve_calibration.safetensors"
#: the fewest calibration texts a calibrated method accepts (the calibration slice is a
#: quarter of the eval file, at most 64 texts)
MIN_CALIBRATION = 16


@dataclass(frozen=True)
class Recipe:
    """How a model was (or is to be) quantized: enough to re-apply it exactly."""

    method: str
    keep: tuple[str, ...] = ()  # linear layers left in full precision
    #: measured and accepted by ``sureserve quantize`` (False: a bare load(quantization=))
    evaluated: bool = False
    base: str | None = None  # the model it was made from
    golden: dict[str, Any] | None = field(default=None, compare=False)
    #: calibrated methods: each quantized layer's largest absolute input per channel
    calibration: dict[str, Any] | None = field(default=None, compare=False)

    def summary(self) -> dict[str, Any]:
        """What the recipe is, without its golden outputs (for info, /info and locks)."""
        return {"method": self.method, "full_precision_layers": list(self.keep),
                "evaluated": self.evaluated, "base_model": self.base}

    def to_dict(self) -> dict[str, Any]:
        return self.summary() | {"golden": self.golden}


def read_recipe(folder: Path) -> Recipe | None:
    """The recipe stored in a folder written by ``sureserve quantize -o``, if any."""
    path = folder / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        calibration = None
        if (folder / CALIBRATION_FILE).is_file():
            from safetensors.torch import load_file

            calibration = load_file(str(folder / CALIBRATION_FILE))
        return Recipe(str(d["method"]), tuple(d.get("full_precision_layers") or ()),
                      bool(d.get("evaluated")), d.get("base_model"), d.get("golden"),
                      calibration)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise SettingsError(f"{path} is not a readable quantization recipe: {exc}",
                            "re-create the folder with `sureserve quantize ... -o DIR`") from exc


def get(name: str) -> Method:
    if name not in METHODS:
        raise SettingsError(f"unknown quantization method {name!r}",
                            f"use one of {', '.join(METHODS)}")
    return METHODS[name]


def unavailable(method: Method, task: str, device: str, caps: DeviceCaps) -> str | None:
    """Why ``method`` cannot run for ``task`` on ``device`` here, or None when it can."""
    if task not in method.tasks:
        return f"not a {task} method (it applies to {', '.join(method.tasks)})"
    on_cuda = device.startswith("cuda")
    if method.device == "cuda" and not on_cuda:
        return "flash attention needs a CUDA GPU"
    if method.device == "cpu" and on_cuda:
        return "a CPU kernel; on CUDA the 8-bit/4-bit candidates are bnb-int8 and bnb-nf4"
    if method.name.startswith("bnb-"):
        if importlib.util.find_spec("bitsandbytes") is None:
            return "the bitsandbytes package is not installed (pip install bitsandbytes)"
        if not on_cuda and not device.startswith("cpu"):
            return f"bitsandbytes has no {device} backend here"
    if method.name == "bf16-flash":
        if not caps.flash_attn_installed:
            return "the flash_attn package is not installed"
        if (caps.cuda_capability or (0, 0)) < (8, 0):
            return "flash attention needs compute capability >= 8.0"
    if method.calibrated:
        return int8_matmul_available()
    if method.device == "cpu" and method.name != "int8-dynamic":
        import torch

        op = "_weight_int4pack_mm_for_cpu" if "int4" in method.name else "_weight_int8pack_mm"
        if not hasattr(torch.ops.aten, op):
            return f"this torch build has no {op} kernel"
    return None


def int8_matmul_available() -> str | None:
    """Why oneDNN's int8 matmul (``onednn::qlinear_pointwise``, ``int8-smooth``'s kernel)
    cannot run here, or None."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if not hasattr(torch.ops.onednn, "qlinear_pointwise") or \
            not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return "this torch build has no oneDNN int8 matmul (onednn::qlinear_pointwise)"
    return None


def linear_layers(model: Any, heads: bool = False) -> list[str]:
    """Names of the linear layers a layerwise method quantizes (heads excluded unless
    ``heads``: ``Method.heads``)."""
    import torch

    return [name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear)
            and (heads or not any(part in HEAD_NAMES for part in name.split(".")))]


def dtype_on(method: Method, device: str) -> str:
    """The dtype of the rest of the model: bitsandbytes' 16-bit compute is a GPU choice; on
    a CPU (where bf16/fp16 matmuls measured 0.01x fp32 here) the rest stays in float32."""
    if method.name.startswith("bnb-") and not device.startswith("cuda"):
        return "float32"
    return method.dtype


def load_kwargs(method: Method, keep: Collection[str], device: str = "cuda:0"
                ) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for methods that act at load time (bitsandbytes):
    the config, and every module on ``device`` (bitsandbytes places its own weights)."""
    if not method.name.startswith("bnb-"):
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    skip = sorted(set(keep) | set(HEAD_NAMES))
    place = {"device_map": {"": device}}
    if method.name == "bnb-int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True,
                                                          llm_int8_skip_modules=skip), **place}
    compute = getattr(torch, dtype_on(method, device))
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=skip), **place}


def weights_bytes(model: Any) -> int:
    """Bytes the model's weights take in memory, quantized packs included."""
    import torch

    total = 0
    seen: set[int] = set()

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor):
            if t.data_ptr() in seen:  # tied weights count once
                return
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        elif isinstance(t, tuple | list):
            for x in t:
                add(x)

    for value in model.state_dict(keep_vars=True).values():
        add(value)
    return total
