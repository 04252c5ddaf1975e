"""The sensitivity search: which linear layers to keep in full precision."""

from __future__ import annotations

import time
from typing import Any

from sureserve.loading import precision as Q
from sureserve.loading.packed import copy_packed
from sureserve.quantize import measure as M
from sureserve.quantize.runner import Runner

#: the per-layer scoring uses this many calibration texts of a decoder (perplexity only,
#: cut to SCORE_TOKENS): it runs once per linear layer (210 in smollm2)
SCORE_TEXTS, SCORE_TOKENS = 4, 128


def sensitivity_search(engine: Any, base_model: Any, runner: Runner, ref: Any,
                       method: Q.Method, task: str, thresholds: M.Thresholds,
                       labels: list[int] | None) -> tuple[list[str] | None, dict[str, Any]]:
    """The fewest linear layers to keep in full precision so that the calibration slice
    holds the threshold with a margin (``Thresholds.tightened``); None when even keeping
    all but one layer does not.

    Each layer is scored by the damage of quantizing it alone; then the k most damaging
    are restored for the smallest k (binary search) that passes.
    """
    model = engine.model
    names = [n for n in Q.linear_layers(base_model, method.heads)
             if type(model.get_submodule(n)) is not type(base_model.get_submodule(n))]
    quantized = {n: model.get_submodule(n) for n in names}
    # restored layers keep the baseline's packed linears (loading/packed.py), as served
    full = {n: copy_packed(base_model.get_submodule(n)) for n in names}

    def configure(keep: set[str]) -> None:
        for n in names:
            model.set_submodule(n, full[n] if n in keep else quantized[n])

    started = time.perf_counter()
    damage: dict[str, float] = {}
    score, score_ref = runner, ref
    if task == "generate":  # perplexity of a few short texts: this runs once per layer
        score = Runner(task, runner.texts[:SCORE_TEXTS], max_tokens=SCORE_TOKENS)
        configure(set(names))  # every layer restored: the baseline's answer on them
        score_ref = score.outputs(engine)
    for n in names:  # quantize only n
        configure(set(names) - {n})
        damage[n] = M.damage(task, score.fidelity(score_ref, score.outputs(engine), labels))
    ranked = sorted(names, key=lambda n: -damage[n])

    def holds(k: int) -> bool:
        configure(set(ranked[:k]))
        fid = runner.fidelity(ref, runner.outputs(engine), labels)
        return M.verdict(task, fid, thresholds.tightened()) is None

    lo, hi = 1, len(names) - 1  # keeping every layer is no quantization at all
    if hi < 1 or not holds(hi):
        configure(set())
        return None, {"layers": len(names), "seconds": round(time.perf_counter() - started, 1)}
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    keep = ranked[:lo]
    configure(set(keep))
    info = {"layers": len(names), "kept": len(keep),
            "worst": [{"layer": n, "damage": round(damage[n], 5)} for n in ranked[:5]],
            "seconds": round(time.perf_counter() - started, 1)}
    return keep, info
