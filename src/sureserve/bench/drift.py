"""``sureserve bench drift``: how often ordinary traffic raises a drift alert (it must not),
how many inputs each kind of drift takes to raise its alert and to clear it, and what the
watch costs on the request path.

Ordinary traffic is the realistic mix (VADER snippets with 5% BBC articles, shuffled); the
first window of it is the baseline, and every later step of 100 inputs is one evaluation.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sureserve.bench.harness import write_report

STEP = 100
SCRIPTS = ["😀🔥🚀 ✨💯 🎉🙏", "ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ", "🤖🤖🤖 beep", "ሰላም ለዓለም", "𓀀𓁐𓂀 𓃠", "🍕🍔🌮 🥗",
           "ⴰⵣⵓⵍ ⴰⴷⴷⴰⵔ", "👍👍 👎"]
LOOPY = ["no", "yes", "la", "the", "go", "up", "one", "red", "big", "cat", "ha", "oh", "so",
         "we", "it", "on", "at", "be", "do", "my"]


def unreadable(n: int) -> list[str]:
    """Text an English tokenizer cannot read: emoji and scripts outside its vocabulary."""
    return [f"{SCRIPTS[k % len(SCRIPTS)]} {SCRIPTS[(k * 3 + 1) % len(SCRIPTS)]}"
            for k in range(n)]


def boilerplate(n: int) -> list[str]:
    return [f"Thank you for contacting support. Your ticket number is {1000 + k}. We will "
            "reply within 24 hours." for k in range(n)]


def _scenarios(model: str) -> dict[str, tuple[Callable[[int], list[str]], set[str]]]:
    """name -> (texts of that drift, the signals expected to alert on it)."""
    from sureserve.zoo.corpora import load_bbc, load_vader

    articles = [t for _, t in load_bbc()]
    out: dict[str, tuple[Callable[[int], list[str]], set[str]]] = {
        "unreadable text": (unreadable, {"unknown_tokens", "length_psi"}),
        "only long articles": (lambda n: (articles * 2)[:n], {"cut_share", "length_psi"}),
        "blank inputs": (lambda n: [" " * (k % 3 + 1) for k in range(n)], {"empty_inputs"}),
    }
    if model == "minilm":
        out["boilerplate"] = (boilerplate, {"collapse", "mean_shift"})
    if model == "sentiment-demo":
        negative = [r.text for r in load_vader("movieReviewSnippets") if r.score < -2.5]
        out["only strongly negative reviews"] = (lambda n: (negative * 2)[:n],
                                                 {"label_js", "dominant_label"})
    return out


def _stream(texts: list[str]) -> Iterator[list[str]]:
    for k in range(0, len(texts), STEP):
        yield texts[k:k + STEP]


@dataclass
class _Tally:
    """Evaluations of ordinary traffic: how many alerted, by signal, and each signal's
    highest score (the headroom under its threshold)."""

    evaluations: int = 0
    alerting: int = 0
    by_signal: Counter[str] = field(default_factory=Counter)
    peak: dict[str, float] = field(default_factory=dict)

    def add(self, signals: list[Any]) -> None:
        self.evaluations += 1
        self.alerting += any(s.alert for s in signals)
        for s in signals:
            self.by_signal[s.name] += s.alert
            if s.score is not None:
                self.peak[s.name] = max(self.peak.get(s.name, 0.0), s.score)

    def to_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "false_alert_evaluations": self.alerting,
                "false_alert_rate": self.alerting / max(self.evaluations, 1),
                "false_alerts_by_signal": dict(self.by_signal),
                "peak_scores_on_ordinary": {k: round(v, 4) for k, v in self.peak.items()}}


def run_encoder(model: str, window: int, normal: int, log: Callable[[str], None]
                ) -> dict[str, Any]:
    import sureserve
    from sureserve.zoo.corpora import realistic_mix

    engine = sureserve.load(model, drift_window=window, truncation="truncate")
    watch = engine.watch
    assert watch is not None
    query = "Shares fell after the bank reported lower profits." if model == "rerank-demo" \
        else None

    def feed(texts: list[str]) -> None:
        engine.run(texts, query=query)

    mix = realistic_mix(window + normal, 0.05, seed=7)
    feed(mix[:window])  # the baseline
    tally = _Tally()
    for chunk in _stream(mix[window:]):
        feed(chunk)
        tally.add(watch.evaluate()[0])
    log(f"{model}: {tally.alerting} of {tally.evaluations} evaluations of ordinary traffic "
        "alerted")
    result: dict[str, Any] = {
        "window": window, "ordinary_inputs": normal, **tally.to_dict(),
        "thresholds": {s.name: s.threshold for s in watch.signals}, "scenarios": {}}
    calm = realistic_mix(4 * window, 0.05, seed=8)
    for name, (make, expected) in _scenarios(model).items():
        result["scenarios"][name] = _scenario(watch, feed, make(2 * window), calm, expected)
        log(f"{model}: {name}: {result['scenarios'][name]}")
    return result


def _scenario(watch: Any, feed: Callable[[list[str]], None], drifted: list[str],
              calm: list[str], expected: set[str]) -> dict[str, Any]:
    """Inputs of drift until an expected signal alerts, then of ordinary traffic until
    every alert has cleared (each at most two windows)."""
    sent, raised = 0, set()
    for k in range(0, len(drifted), STEP // 2):
        feed(drifted[k:k + STEP // 2])
        sent += len(drifted[k:k + STEP // 2])
        raised = {s.name for s in watch.evaluate()[0] if s.alert}
        if raised & expected:
            break
    to_alert = sent if raised & expected else None
    cleared_after = None
    back = 0
    for k in range(0, len(calm), STEP // 2):
        feed(calm[k:k + STEP // 2])
        back += len(calm[k:k + STEP // 2])
        if not any(s.alert for s in watch.evaluate()[0]):
            cleared_after = back
            break
    return {"expected": sorted(expected), "raised": sorted(raised),
            "inputs_to_alert": to_alert, "inputs_to_clear": cleared_after}


def run_generate(window: int, normal: int, log: Callable[[str], None]) -> dict[str, Any]:
    import sureserve
    from sureserve.zoo.corpora import load_vader

    engine = sureserve.load("smollm2", drift_window=window)
    watch = engine.watch
    assert watch is not None
    rows = load_vader("movieReviewSnippets")
    random.Random(9).shuffle(rows)
    prompts: list[Any] = [[{"role": "user", "content": f"Reply in one sentence to this "
                            f"review: {r.text}"}] for r in rows[:window + normal]]
    started = time.perf_counter()
    engine.complete(prompts[:window], max_new_tokens=32)
    tally = _Tally()
    for k in range(window, window + normal, window // 2):
        engine.complete(prompts[k:k + window // 2], max_new_tokens=32)
        tally.add(watch.evaluate()[0])
    base = watch.baseline
    loops = [" ".join([w] * 12) for w in LOOPY] * (window // len(LOOPY) + 1)
    engine.complete(loops[:window], max_new_tokens=32)
    raised = sorted(s.name for s in watch.evaluate()[0] if s.alert)
    result = {"window": window, "ordinary_prompts": normal, **tally.to_dict(),
              "baseline_loop_share": base.loops / max(sum(base.finishes.values()), 1),
              "looping_prompts_raised": raised,
              "seconds": round(time.perf_counter() - started, 1)}
    log(f"smollm2: {result}")
    return result


def overhead(log: Callable[[str], None], n: int = 2000, rounds: int = 3) -> dict[str, Any]:
    """Offline minilm throughput with the watch on and off, alternated."""
    import sureserve
    from sureserve.zoo.corpora import realistic_mix

    texts = realistic_mix(n, 0.05, seed=3)
    engines = {on: sureserve.load("minilm", drift_watch=on, truncation="truncate")
               for on in (True, False)}
    best = {True: float("inf"), False: float("inf")}
    for _ in range(rounds):
        for on, engine in engines.items():
            start = time.perf_counter()
            engine.run(texts)
            best[on] = min(best[on], time.perf_counter() - start)
    ratio = best[False] / best[True]
    log(f"overhead: watch on {n / best[True]:.0f} texts/s, off {n / best[False]:.0f} texts/s "
        f"(on/off throughput {ratio:.3f})")
    return {"texts": n, "on_texts_per_s": round(n / best[True], 1),
            "off_texts_per_s": round(n / best[False], 1), "on_over_off": round(ratio, 4)}


def run_bench(window: int, normal: int, parts: list[str], out: Path | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    import sureserve

    report: dict[str, Any] = {"sureserve": sureserve.__version__, "torch": torch.__version__,
                              "models": {}}
    for model in ("minilm", "sentiment-demo", "rerank-demo"):
        if model in parts or "encoders" in parts:
            report["models"][model] = run_encoder(model, window, normal, log)
    if "smollm2" in parts:
        report["models"]["smollm2"] = run_generate(min(window, 100), 3 * min(window, 100),
                                                   log)
    if "overhead" in parts:
        report["overhead"] = overhead(log)
    return write_report(out, report)


def print_report(rep: dict[str, Any], log: Callable[[str], None]) -> None:
    for model, r in rep["models"].items():
        log(f"{model}: window {r['window']}, {r['false_alert_evaluations']} of "
            f"{r['evaluations']} evaluations of ordinary traffic alerted "
            f"{r.get('false_alerts_by_signal')}")
        for name, s in r.get("scenarios", {}).items():
            log(f"  {name}: alert after {s['inputs_to_alert']} inputs ({', '.join(s['raised'])})"
                f", cleared after {s['inputs_to_clear']} ordinary inputs")
    if "overhead" in rep:
        log(f"watch on/off throughput: {rep['overhead']['on_over_off']}")
