"""How fast this machine's CPU multiplies in each dtype, measured once and cached.

CPU flags do not predict it: a CPU with AVX-512 BF16 but no AMX ran minilm in bf16 at
0.66x its fp32 speed, one without any bf16 support at 0.12x (BENCHMARKS.md). So the plan's
dtype advice comes from this short measurement (~0.5 s, once per CPU model, torch version
and thread count), kept under ``<home>/machine/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
SIZE, SECONDS = 512, 0.12


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bound_onednn_cache(capacity: int) -> int:
    """Cap oneDNN's primitive cache for this process; returns the capacity in force.

    oneDNN (torch's CPU kernels for GELU, bf16 matmuls, convolutions) compiles one
    primitive per tensor shape and keeps up to 1,024 of them. A server's batches have a
    new shape almost every time (batch size x padded length x packing), so the cache, and
    the heap it pins, grew for as long as traffic ran (BENCHMARKS.md "Memory under load").
    oneDNN reads the variable once, when it first compiles a primitive, so this must run
    before any model does; a value the user set wins."""
    return int(os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity)))


def gemm_gflops(dtype_name: str = "float32", n: int = 2048, seconds: float = 2.0) -> float:
    """Measured matrix-multiply rate of this machine, in GFLOP/s, for square n x n (also
    the benchmarks' GEMM figure)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def cpu_speeds(home: Path) -> dict[str, float]:
    """Matmul GFLOP/s of each dtype on this CPU (cached per machine)."""
    import torch

    ident = f"{_cpu_name()}|{platform.machine()}|{torch.__version__}|{torch.get_num_threads()}"
    path = home / "machine" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    try:
        return {k: float(v) for k, v in json.loads(path.read_text())["gflops"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    speeds = {d: round(gemm_gflops(d, SIZE, SECONDS), 2) for d in DTYPES}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"machine": ident, "gflops": speeds}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home still gets the advice, measured again next time
    return speeds


def bf16_speed(home: Path) -> float:
    """bf16 matmul speed as a multiple of fp32 on this CPU."""
    s = cpu_speeds(home)
    return s["bfloat16"] / max(s["float32"], 1e-9)
