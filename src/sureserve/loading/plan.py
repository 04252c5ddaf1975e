"""The load plan: which device, dtype and attention kernel, and why.

``make_plan`` is a pure function of the requested values and the machine's capabilities
(``DeviceCaps``), so every branch is testable with fake capabilities. ``detect_caps``
is the only part that asks torch about the real machine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from sureserve.errors import SettingsError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class DeviceCaps:
    cuda_count: int = 0
    #: compute capability of cuda:0, e.g. (9, 0) for an H100/H200
    cuda_capability: tuple[int, int] | None = None
    cuda_name: str | None = None
    mps: bool = False
    flash_attn_installed: bool = False
    #: bf16 matmul speed as a multiple of fp32, measured on this CPU (loading/machine.py);
    #: None when not measured. The dtype advice comes from it, not from CPU flags.
    cpu_bf16_speed: float | None = None


@dataclass(frozen=True)
class LoadPlan:
    device: str
    dtype: str
    attn_implementation: str
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"device": self.device, "dtype": self.dtype,
                "attn_implementation": self.attn_implementation,
                "reasons": list(self.reasons), "warnings": list(self.warnings)}


def detect_caps(home: Path | None = None) -> DeviceCaps:
    """The machine's devices; with ``home``, also this CPU's measured bf16 speed (cached)."""
    import torch

    from sureserve.loading.machine import bf16_speed

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cap = torch.cuda.get_device_capability(0) if count else None
    name = torch.cuda.get_device_name(0) if count else None
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return DeviceCaps(
        cuda_count=count, cuda_capability=cap, cuda_name=name, mps=mps,
        flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
        cpu_bf16_speed=bf16_speed(home) if home is not None and not count else None,
    )


def normalize_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    key = dtype.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise SettingsError(f"unknown dtype {dtype!r}",
                            f"use one of {', '.join(sorted(set(DTYPES.values())))}")
    return DTYPES[key]


def make_plan(
    caps: DeviceCaps,
    device: str | None = None,
    dtype: str | None = None,
    attn: str | None = None,
) -> LoadPlan:
    reasons: list[str] = []
    warnings: list[str] = []
    dev = _choose_device(caps, device, reasons)
    dt = _choose_dtype(caps, dev, normalize_dtype(dtype), reasons, warnings)
    at = _choose_attention(caps, dev, dt, attn, reasons, warnings)
    return LoadPlan(dev, dt, at, reasons, warnings)


def _choose_device(caps: DeviceCaps, device: str | None, reasons: list[str]) -> str:
    if device is not None:
        kind, _, index = device.partition(":")
        if kind == "cuda":
            if caps.cuda_count == 0:
                raise SettingsError(
                    "device cuda was requested but no CUDA GPU is visible",
                    "install a CUDA build of torch (see README) or use --device cpu")
            if index and int(index) >= caps.cuda_count:
                raise SettingsError(f"device {device} requested but only {caps.cuda_count} "
                                    "CUDA GPU(s) are visible", "pick an index below that")
        elif kind == "mps" and not caps.mps:
            raise SettingsError("device mps was requested but MPS is not available",
                                "use --device cpu")
        elif kind not in ("cpu", "cuda", "mps"):
            raise SettingsError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps")
        reasons.append(f"device {device}: requested")
        return device
    if caps.cuda_count:
        reasons.append(f"device cuda:0: a CUDA GPU is visible ({caps.cuda_name})")
        return "cuda:0"
    if caps.mps:
        reasons.append("device mps: Apple GPU available, no CUDA")
        return "mps"
    reasons.append("device cpu: no CUDA or MPS device is visible")
    return "cpu"


def _choose_dtype(caps: DeviceCaps, dev: str, dtype: str | None,
                  reasons: list[str], warnings: list[str]) -> str:
    if dtype is not None:
        reasons.append(f"dtype {dtype}: requested")
        if dev == "cpu" and dtype == "float16":
            warnings.append("float16 on CPU is slow and lossy; bfloat16 or float32 is better")
        speed = caps.cpu_bf16_speed
        if dev == "cpu" and dtype == "bfloat16" and speed is not None and speed < 1:
            warnings.append(f"bf16 matrix multiplies measured {speed:.2f}x the fp32 speed on "
                            "this CPU: bf16 will be slower, not faster")
        return dtype
    if dev == "cpu":
        reasons.append("dtype float32: CPU default, keeps outputs equal to the reference"
                       + _bf16_hint(caps.cpu_bf16_speed))
        return "float32"
    if dev.startswith("cuda"):
        cap = caps.cuda_capability or (0, 0)
        if cap >= (8, 0):
            reasons.append(f"dtype bfloat16: GPU compute capability {cap[0]}.{cap[1]} >= 8.0 "
                           "supports bf16 (fp16's range without its overflow risk)")
            return "bfloat16"
        reasons.append(f"dtype float16: GPU compute capability {cap[0]}.{cap[1]} < 8.0 "
                       "lacks fast bf16")
        return "float16"
    reasons.append("dtype float16: MPS default")
    return "float16"


def _bf16_hint(speed: float | None) -> str:
    if speed is None:
        return ""
    from sureserve.loading.machine import BF16_WORTH

    if speed >= BF16_WORTH:
        return (f" (bf16 matrix multiplies measured {speed:.1f}x faster here: `sureserve "
                "quantize MODEL --eval FILE` measures whether bf16 holds on your data)")
    return f" (bf16 measured {speed:.2f}x the fp32 speed here: not worth it)"


def _choose_attention(caps: DeviceCaps, dev: str, dtype: str, attn: str | None,
                      reasons: list[str], warnings: list[str]) -> str:
    if attn is not None and attn not in ATTENTION:
        raise SettingsError(f"unknown attention implementation {attn!r}",
                            f"use one of {', '.join(ATTENTION)}")
    fa2_problem = _flash_attention_problem(caps, dev, dtype)
    if attn == "flash_attention_2":
        if fa2_problem:
            warnings.append(f"flash_attention_2 was requested but {fa2_problem}: "
                            "falling back to sdpa")
            reasons.append(f"attention sdpa: fallback, because {fa2_problem}")
            return "sdpa"
        reasons.append("attention flash_attention_2: requested and supported")
        return attn
    if attn is not None:
        reasons.append(f"attention {attn}: requested")
        return attn
    if fa2_problem is None:
        reasons.append("attention flash_attention_2: installed and GPU compute capability >= 8.0")
        return "flash_attention_2"
    reasons.append(f"attention sdpa: default (flash_attention_2 not used: {fa2_problem})")
    return "sdpa"


def _flash_attention_problem(caps: DeviceCaps, dev: str, dtype: str) -> str | None:
    if not dev.startswith("cuda"):
        return f"it needs a CUDA GPU and the device is {dev}"
    if not caps.flash_attn_installed:
        return "the flash_attn package is not installed"
    cap = caps.cuda_capability or (0, 0)
    if cap < (8, 0):
        return f"GPU compute capability {cap[0]}.{cap[1]} is below 8.0"
    if dtype not in ("float16", "bfloat16"):
        return f"it needs float16 or bfloat16 and the dtype is {dtype}"
    return None
