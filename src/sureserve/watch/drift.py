"""The drift watch: is live traffic (and what the model answers) still like its baseline?

One ``DriftWatch`` per loaded model (``Engine.watch``). The request path only *observes*:
a few numbers per input appended to bounded deques under a lock (``observe_*``), whoever
sends the input (the server's batcher, an offline file job, the Python API, the generation
loop). ``evaluate`` computes every signal over the last ``drift_window`` inputs, off the
hot path (the server runs it on a worker thread every second; an offline run once per
window and at the end), and reports which alerts started or cleared.

The baseline is, in order of preference: a reference file of typical inputs (``use``
``recording`` while it runs through the model), else the first window of live traffic.
Two signals do not wait for it: the unknown-token rate and the collapse of embeddings are
compared with the gate's probe texts until the baseline is complete (a model fed unreadable
text from its first request on is still caught), and the dominant-label share is absolute.

An alert starts when a score goes above its threshold and clears when it falls to
``CLEAR_FRACTION`` of it, so a score hovering at the threshold does not flap. An alert
describes the last ``drift_window`` inputs, however old: with no traffic it stays as it is.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sureserve.settings import Settings
from sureserve.watch import signals as sig

log = logging.getLogger("sureserve.drift")
CLEAR_FRACTION = 0.8
HISTORY = 120  # evaluations kept for charts (doctor --html), at most one per HISTORY_EVERY s
HISTORY_EVERY = 10.0
FINISH_REASONS = ("stop", "length", "error")

#: signal name -> (Settings field of its threshold, what it measures), per task
TEXT_SIGNALS = {
    "unknown_tokens": ("drift_unknown_tokens", "share of tokens the tokenizer maps to its "
                       "unknown token, above the baseline's"),
    "cut_share": ("drift_cut_share", "share of inputs over the usable maximum (truncated, "
                  "chunked or refused), above the baseline's"),
    "empty_inputs": ("drift_empty_inputs", "share of empty or whitespace-only inputs, above "
                     "the baseline's"),
    "length_psi": ("drift_length_psi", "population stability index of input lengths in "
                   "tokens (bins 8, 16, ..., 1024) vs the baseline"),
}
TASK_SIGNALS = {
    "classify": {
        "label_js": ("drift_label_js", "Jensen-Shannon divergence (bits) of the predicted "
                     "label mix vs the baseline's"),
        "dominant_label": ("drift_label_share", "share of the window's most frequent label "
                           "(alerts only if the baseline's share of it was lower)"),
        "top_score_drop": ("drift_top_score_drop", "drop of the mean top-label probability "
                           "from the baseline's"),
    },
    "embed": {
        "collapse": ("drift_collapse", "mean pairwise cosine of the window's embeddings, as "
                     "the share of the distance from the baseline's to 1 (identical) closed"),
        "mean_shift": ("drift_mean_shift", "1 - cosine between the window's mean embedding "
                       "and the baseline's"),
    },
    "sparse": {
        "collapse": ("drift_collapse", "mean pairwise cosine of the window's sparse vectors, "
                     "as the share of the distance from the baseline's to 1 closed"),
        "active_terms": ("drift_active_terms", "|log2| of the window's mean non-zero terms "
                         "per text over the baseline's (1: halved or doubled)"),
    },
    "generate": {
        "finish_js": ("drift_finish_js", "Jensen-Shannon divergence (bits) of finish reasons "
                      "(stop, length, error) vs the baseline's"),
        "empty_outputs": ("drift_empty_outputs", "share of completions with no visible text, "
                          "above the baseline's"),
        "loops": ("drift_loops", "share of completions ending in a short block of tokens "
                  "repeated 3+ times, above the baseline's"),
    },
}


def count_unknown(ids: Sequence[int], unknown_id: int | None) -> int:
    """How many of ``ids`` are the unknown token (0 for a tokenizer without one)."""
    return 0 if unknown_id is None else list(ids).count(unknown_id)


def signal_names(task: str, has_unknown: bool = True) -> list[str]:
    names = [n for n in TEXT_SIGNALS if has_unknown or n != "unknown_tokens"]
    return names + list(TASK_SIGNALS.get(task, {}))


def threshold_field(name: str) -> str:
    if name in TEXT_SIGNALS:
        return TEXT_SIGNALS[name][0]
    return next(t[name][0] for t in TASK_SIGNALS.values() if name in t)


@dataclass
class Signal:
    """One measure over the current window. ``score`` None: not enough inputs yet, or no
    baseline to compare with (``detail`` says which)."""

    name: str
    score: float | None
    threshold: float
    alert: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"signal": self.name, "score": None if self.score is None else
                round(self.score, 4), "threshold": self.threshold, "alert": self.alert,
                "detail": self.detail}


@dataclass
class Stats:
    """Aggregates over a set of observations: a baseline, or one evaluation's window."""

    inputs: int = 0
    tokens: int = 0
    unknown: int = 0
    cut: int = 0
    empty: int = 0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(len(sig.LENGTH_EDGES) + 1))
    labels: Counter[int] = field(default_factory=Counter)
    top_score: float = 0.0  # summed
    vectors: int = 0
    unit_sum: np.ndarray | None = None
    active: int = 0  # sparse vectors: non-zero terms, summed
    finishes: Counter[str] = field(default_factory=Counter)
    empty_outputs: int = 0
    loops: int = 0

    @property
    def outputs(self) -> int:
        return max(sum(self.labels.values()), self.vectors, sum(self.finishes.values()))

    def add_text(self, tokens: int, unknown: int, cut: bool, empty: bool) -> None:
        self.inputs += 1
        self.tokens += tokens
        self.unknown += unknown
        self.cut += cut
        self.empty += empty
        self.lengths[sig.length_bin(tokens)] += 1

    def add_output(self, out: tuple[Any, ...]) -> None:
        kind = out[0]
        if kind == "label":
            self.labels[out[1]] += 1
            self.top_score += out[2]
        elif kind == "vector":
            self.vectors += 1
            self.unit_sum = out[1].astype(np.float64) if self.unit_sum is None \
                else self.unit_sum + out[1]
        elif kind == "sparse":  # ("sparse", width, term ids, unit weights)
            self.vectors += 1
            self.active += len(out[2])
            if self.unit_sum is None:
                self.unit_sum = np.zeros(out[1])
            self.unit_sum[out[2]] += out[3]
        else:  # completion
            self.finishes[out[1]] += 1
            self.empty_outputs += out[2]
            self.loops += out[3]

    def share(self, part: int, whole: int) -> float:
        return part / whole if whole else 0.0

    def mean_cosine(self) -> float:
        return 0.0 if self.unit_sum is None else sig.mean_pairwise_cosine(self.unit_sum,
                                                                           self.vectors)


class DriftWatch:
    def __init__(self, model: str, task: str, settings: Settings, labels: Sequence[str] = (),
                 unknown_id: int | None = None, anchor: Stats | None = None) -> None:
        self.model, self.task, self.settings = model, task, settings
        self.labels = list(labels)
        self.unknown_id = unknown_id
        self.size = settings.drift_window
        self.min_inputs = max(10, self.size // 5)
        self.names = signal_names(task, unknown_id is not None)
        self.anchor = anchor or Stats()  # the gate's probe texts
        self.baseline = Stats()
        self.baseline_source = "traffic"  # or "reference <file>"
        self._texts: deque[tuple[int, int, bool, bool]] = deque(maxlen=self.size)
        self._outputs: deque[tuple[Any, ...]] = deque(maxlen=self.size)
        self._recording = False
        self._lock = threading.Lock()
        self.signals: list[Signal] = []
        self.history: deque[tuple[float, dict[str, float | None]]] = deque(maxlen=HISTORY)
        self._last_history = 0.0
        self.evaluated_at = 0.0

    # ---- observing (the request path: cheap, thread-safe) ------------------------------
    def observe_texts(self, tokens: Sequence[int], unknown: Sequence[int] | None = None,
                      cut: Sequence[bool] | None = None,
                      empty: Sequence[bool] | None = None) -> None:
        """Per text: its tokens, how many are unknown, whether it was over the limit and
        whether it was blank (left out: 0 / False for every text)."""
        n = len(tokens)
        rows = zip(tokens, unknown or [0] * n, cut or [False] * n, empty or [False] * n,
                   strict=True)
        with self._lock:
            for row in rows:
                if self._filling(self.baseline.inputs):
                    self.baseline.add_text(*row)
                if not self._recording:
                    self._texts.append(row)

    def _filling(self, have: int) -> bool:
        """Whether an observation goes to the baseline: during a reference run, or while
        the first window of traffic is still being taken as the baseline."""
        return self._recording or (self.baseline_source == "traffic" and have < self.size)

    def observe_labels(self, probs: np.ndarray) -> None:
        """One row of class probabilities per classified text."""
        top = probs.argmax(axis=1)
        self._outputs_add([("label", int(k), float(probs[i, k])) for i, k in enumerate(top)])

    def observe_vectors(self, vectors: np.ndarray) -> None:
        """Pooled embeddings (any scale), one row per text."""
        # float32: a window of 1,000 vectors of a 4,096-wide model is 16 MB, not 32
        self._outputs_add([("vector", v) for v in sig.unit_rows(vectors).astype(np.float32)])

    def observe_sparse(self, rows: np.ndarray) -> None:
        """Sparse vectors (vocabulary-wide rows, mostly zero), one row per text; kept as
        their non-zero terms only (a window of dense rows would be 120 MB for BERT's
        vocabulary)."""
        outs: list[tuple[Any, ...]] = []
        for row in rows:
            idx = np.flatnonzero(row)
            vals = row[idx].astype(np.float64)
            norm = float(np.linalg.norm(vals))
            outs.append(("sparse", row.shape[0], idx.astype(np.int32),
                         (vals / norm if norm > 0 else vals).astype(np.float32)))
        self._outputs_add(outs)

    def observe_completion(self, reason: str, text: str, tokens: Sequence[int]) -> None:
        if reason not in FINISH_REASONS:  # cancelled: the client's doing, not the model's
            return
        self._outputs_add([("completion", reason, not text.strip(), sig.ends_in_loop(tokens))])

    def _outputs_add(self, outs: list[tuple[Any, ...]]) -> None:
        with self._lock:
            for out in outs:
                if self._filling(self.baseline.outputs):
                    self.baseline.add_output(out)
                if not self._recording:
                    self._outputs.append(out)

    @contextlib.contextmanager
    def recording(self, source: str) -> Iterator[None]:
        """Everything observed inside goes to the baseline (a reference file's run), not to
        the window; the baseline is complete when it ends."""
        with self._lock:
            self.baseline, self._recording = Stats(), True
        try:
            yield
        finally:
            with self._lock:
                self._recording = False
                self.baseline_source = f"reference {source}"

    # ---- evaluating (off the hot path) ------------------------------------------------
    def baseline_ready(self, outputs: bool = False) -> bool:
        if self.baseline_source != "traffic":
            return True
        have = self.baseline.outputs if outputs else self.baseline.inputs
        return have >= self.size

    def evaluate(self) -> tuple[list[Signal], list[Signal]]:
        """Every signal over the current window; returns (all signals, signals whose alert
        started or cleared now). Logs one warning per change."""
        with self._lock:
            window = Stats()
            for row in self._texts:
                window.add_text(*row)
            for out in self._outputs:
                window.add_output(out)
        before = {s.name: s.alert for s in self.signals}
        now = [self._signal(name, window, before.get(name, False)) for name in self.names]
        changed = [s for s in now if s.alert != before.get(s.name, False)]
        for s in changed:
            if s.alert:
                log.warning("drift alert on %s: %s = %.4g above %.4g: %s", self.model, s.name,
                            s.score or 0.0, s.threshold, s.detail)
            else:
                log.warning("drift alert cleared on %s: %s = %.4g", self.model, s.name,
                            s.score or 0.0)
        self.signals, self.evaluated_at = now, time.time()
        if self.evaluated_at - self._last_history >= HISTORY_EVERY or changed:
            self.history.append((self.evaluated_at, {s.name: s.score for s in now}))
            self._last_history = self.evaluated_at
        return now, changed

    @property
    def alerts(self) -> list[Signal]:
        return [s for s in self.signals if s.alert]

    def _signal(self, name: str, w: Stats, was_alert: bool) -> Signal:
        threshold = float(getattr(self.settings, threshold_field(name)))
        text_side = name in TEXT_SIGNALS
        have = w.inputs if text_side else w.outputs
        if have < self.min_inputs:
            return Signal(name, None, threshold, was_alert,
                          f"waiting for {self.min_inputs} inputs ({have} so far)")
        measured = self._measure(name, w)
        if measured is None:
            return Signal(name, None, threshold, False, self._pending_detail(not text_side))
        score, detail = measured
        limit = threshold * CLEAR_FRACTION if was_alert else threshold
        return Signal(name, score, threshold, score > limit, detail)

    def _pending_detail(self, outputs: bool) -> str:
        have = self.baseline.outputs if outputs else self.baseline.inputs
        return f"baseline: first {self.size} inputs of traffic ({have} so far)"

    def _base(self, outputs: bool = False) -> tuple[Stats, str] | None:
        if self.baseline_ready(outputs):
            return self.baseline, self.baseline_label()
        return None

    def baseline_label(self) -> str:
        if self.baseline_source != "traffic":
            return self.baseline_source
        return f"first {self.size} inputs of traffic"

    def _measure(self, name: str, w: Stats) -> tuple[float, str] | None:
        """(score, detail) of one signal, or None while it has no baseline."""
        n = f"the last {w.inputs if name in TEXT_SIGNALS else w.outputs} inputs"
        if name in ("unknown_tokens", "collapse"):  # the probe texts stand in until ready
            base, label = self._base(name == "collapse") or (self.anchor, "gate probe texts")
            if name == "unknown_tokens":
                rate, was = w.share(w.unknown, w.tokens), base.share(base.unknown, base.tokens)
                return rate - was, (f"{rate:.1%} of {w.tokens} tokens in {n} are unknown "
                                    f"(baseline {was:.1%}, {label})")
            cos, was = w.mean_cosine(), base.mean_cosine()
            return sig.collapse_score(cos, was), (f"mean pairwise cosine {cos:.3f} over {n} "
                                                  f"(baseline {was:.3f}, {label})")
        if name == "dominant_label":
            return self._dominant(w, n)
        got = self._base(name not in TEXT_SIGNALS)
        if got is None:
            return None
        base, label = got
        return self._relative(name, w, base, f"{n} vs {label}")

    def _dominant(self, w: Stats, n: str) -> tuple[float, str]:
        k, count = w.labels.most_common(1)[0]
        share = count / max(sum(w.labels.values()), 1)
        label = self.labels[k] if k < len(self.labels) else str(k)
        got = self._base(True)
        was = got[0].share(got[0].labels[k], sum(got[0].labels.values())) if got else 0.0
        if got and was >= self.settings.drift_label_share:
            # a model whose ordinary traffic is this one-sided is not alerted on it
            return 0.0, f"{label} is {share:.1%} of {n}, as in the baseline ({was:.1%})"
        return share, f"{label} is {share:.1%} of {n}" + (f" (baseline {was:.1%})"
                                                           if got else "")

    def _relative(self, name: str, w: Stats, b: Stats, n: str) -> tuple[float, str]:
        if name == "cut_share":
            a, z = w.share(w.cut, w.inputs), b.share(b.cut, b.inputs)
            return a - z, f"{a:.1%} over the usable maximum in {n} ({z:.1%})"
        if name == "empty_inputs":
            a, z = w.share(w.empty, w.inputs), b.share(b.empty, b.inputs)
            return a - z, f"{a:.1%} empty in {n} ({z:.1%})"
        if name == "length_psi":
            mean_w, mean_b = w.share(w.tokens, w.inputs), b.share(b.tokens, b.inputs)
            return sig.psi(b.lengths, w.lengths), (f"mean {mean_w:.0f} tokens in {n} "
                                                    f"({mean_b:.0f})")
        if name == "label_js":
            keys = sorted(set(w.labels) | set(b.labels))
            return sig.js_divergence([b.labels[k] for k in keys],
                                     [w.labels[k] for k in keys]), \
                f"labels {self._mix(w)} in {n} ({self._mix(b)})"
        if name == "top_score_drop":
            a = w.share(w.top_score, sum(w.labels.values()))  # type: ignore[arg-type]
            z = b.share(b.top_score, sum(b.labels.values()))  # type: ignore[arg-type]
            return z - a, f"mean top probability {a:.3f} in {n} ({z:.3f})"
        if name == "active_terms":
            a, z = w.share(w.active, w.vectors), b.share(b.active, b.vectors)
            score = abs(float(np.log2(max(a, 0.5) / max(z, 0.5))))
            return score, f"{a:.1f} non-zero terms per text in {n} ({z:.1f})"
        if name == "mean_shift":
            if w.unit_sum is None or b.unit_sum is None:
                return 0.0, "no embeddings"
            return sig.mean_shift(w.unit_sum, b.unit_sum), f"mean embedding of {n}"
        if name == "finish_js":
            return sig.js_divergence([b.finishes[r] for r in FINISH_REASONS],
                                     [w.finishes[r] for r in FINISH_REASONS]), \
                f"finish reasons {self._finishes(w)} in {n} ({self._finishes(b)})"
        total_w, total_b = sum(w.finishes.values()), sum(b.finishes.values())
        if name == "empty_outputs":
            a, z = w.share(w.empty_outputs, total_w), b.share(b.empty_outputs, total_b)
            return a - z, f"{a:.1%} empty completions in {n} ({z:.1%})"
        a, z = w.share(w.loops, total_w), b.share(b.loops, total_b)  # loops
        return a - z, f"{a:.1%} of completions end in a loop in {n} ({z:.1%})"

    def _mix(self, s: Stats) -> str:
        total = max(sum(s.labels.values()), 1)
        return ", ".join(f"{self.labels[k] if k < len(self.labels) else k} {c / total:.0%}"
                         for k, c in s.labels.most_common(4))

    @staticmethod
    def _finishes(s: Stats) -> str:
        total = max(sum(s.finishes.values()), 1)
        return ", ".join(f"{r} {s.finishes[r] / total:.0%}" for r in FINISH_REASONS
                         if s.finishes[r])

    # ---- reporting ---------------------------------------------------------------------
    def label_mix(self) -> dict[str, dict[str, float]]:
        """Label shares of the window and the baseline (classify), for charts."""
        with self._lock:
            window = Counter(o[1] for o in self._outputs if o[0] == "label")
        out = {}
        for what, counts in (("window", window), ("baseline", self.baseline.labels)):
            total = max(sum(counts.values()), 1)
            out[what] = {(self.labels[k] if k < len(self.labels) else str(k)): c / total
                         for k, c in sorted(counts.items())}
        return out

    def info(self) -> dict[str, Any]:
        """What ``/info`` shows: the baseline, the window and every signal."""
        ready = self.baseline_ready() and (self.task not in TASK_SIGNALS
                                           or self.baseline_ready(True))
        return {
            "baseline": self.baseline_label(), "baseline_ready": ready,
            "baseline_inputs": self.baseline.inputs, "window": self.size,
            "window_inputs": len(self._texts), "min_inputs": self.min_inputs,
            "signals": [s.to_dict() for s in self.signals],
            "history": [{"time": round(t, 1), "scores": scores} for t, scores in self.history],
            **({"label_mix": self.label_mix()} if self.task == "classify" else {}),
        }
