"""Timing, peak memory and hardware-rate helpers shared by the benchmarks."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from sureserve.batching.planner import padding_ratio, padding_share


class RssSampler:
    """Peak resident memory of a process (this one by default) while a block runs
    (sampled every 10 ms)."""

    def __init__(self, pid: int | None = None) -> None:
        self.proc = psutil.Process(os.getpid() if pid is None else pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self) -> RssSampler:
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


@dataclass
class Result:
    name: str
    seconds: float
    texts: int
    real_tokens: int
    computed_tokens: int
    peak_rss_mb: float
    outputs: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def padding_ratio(self) -> float:
        return padding_ratio(self.real_tokens, self.computed_tokens)

    @property
    def padding_share(self) -> float:
        return padding_share(self.real_tokens, self.computed_tokens)


def timed(name: str, fn: Callable[[], tuple[Any, int]], texts: int, real_tokens: int) -> Result:
    """Run ``fn`` (returning outputs and computed tokens) under the clock and RSS sampler."""
    gc.collect()
    with RssSampler() as rss:
        start_rss = rss.peak
        start = time.perf_counter()
        outputs, computed = fn()
        seconds = time.perf_counter() - start
    r = Result(name, seconds, texts, real_tokens, computed, rss.peak / 2**20, outputs)
    r.extra["rss_growth_mb"] = round((rss.peak - start_rss) / 2**20)
    return r


def linear_flops_per_token(model: Any) -> int:
    """2 x weights of every nn.Linear the tokens pass through (the GEMM work per token)."""
    import torch

    return sum(2 * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def cpu_has_bf16() -> bool:
    """bf16 measured faster than fp32 on this CPU (loading/machine.py), not read from flags."""
    from sureserve.loading.machine import bf16_speed
    from sureserve.settings import Settings

    return bf16_speed(Settings().home_dir()) > 1.0


def write_report(out: Path | None, report: dict[str, Any]) -> dict[str, Any]:
    """Write a benchmark's JSON report (when ``out`` is given); returns the report."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report
