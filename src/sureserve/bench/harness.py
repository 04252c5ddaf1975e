"""Timing, peak memory and hardware-rate helpers shared by the benchmarks."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sureserve.batching.planner import padding_ratio, padding_share
from sureserve.loading.machine import RssSampler


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


def cpu_has_bf16() -> bool:
    """bf16 measured faster than fp32 on this CPU (loading/machine.py), not read from flags."""
    from sureserve.loading.machine import bf16_speed
    from sureserve.settings import Settings

    return bf16_speed(Settings().home_dir()) > 1.0


def alternating(contenders: Sequence[tuple[str, Callable[[], Any]]], items: int, unit: str,
                log: Callable[[str], None], rounds: int = 2
                ) -> tuple[dict[str, Any], dict[str, float]]:
    """Each contender once to warm up, then ``rounds`` timed runs with the order reversed
    every other round (the host's drift shared out); returns each one's last output and
    its best seconds, logging ``items``/s per run."""
    for _, fn in contenders:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in contenders}
    results: dict[str, Any] = {}
    for rnd in range(rounds):
        for name, fn in contenders if rnd % 2 == 0 else contenders[::-1]:
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            log(f"{name}: {items / times[name][-1]:.1f} {unit}/s")
    return results, {k: min(v) for k, v in times.items()}


def write_report(out: Path | None, report: dict[str, Any]) -> dict[str, Any]:
    """Write a benchmark's JSON report (when ``out`` is given); returns the report."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report
