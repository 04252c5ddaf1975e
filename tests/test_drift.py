"""The drift watch on its own: measures, baselines, alerts and their hysteresis (no model)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sureserve.settings import Settings
from sureserve.watch import signals as sig
from sureserve.watch.drift import DriftWatch, Stats


def test_divergences() -> None:
    assert sig.js_divergence([50, 50], [50, 50]) == pytest.approx(0.0)
    assert sig.js_divergence([100, 0], [0, 100]) == pytest.approx(1.0)
    assert 0.1 < sig.js_divergence([50, 50], [90, 10]) < 0.2
    assert sig.psi([10, 20, 30], [10, 20, 30]) == pytest.approx(0.0)
    assert sig.psi([100, 0, 0], [0, 0, 100]) > 5  # smoothed: large but finite


def test_mean_pairwise_cosine_from_the_sum() -> None:
    rng = np.random.default_rng(0)
    v = sig.unit_rows(rng.normal(size=(50, 16)))
    full = v @ v.T
    expected = (full.sum() - 50) / (50 * 49)
    assert sig.mean_pairwise_cosine(v.sum(axis=0), 50) == pytest.approx(expected)
    same = sig.unit_rows(np.ones((10, 4)))
    assert sig.mean_pairwise_cosine(same.sum(axis=0), 10) == pytest.approx(1.0)
    assert sig.collapse_score(0.1, 0.1) == 0.0
    assert sig.collapse_score(1.0, 0.1) == pytest.approx(1.0)


@pytest.mark.parametrize(("tokens", "loops"), [
    ([7] * 20, True),  # one token over and over
    ([1, 2, 3] * 8, True),  # a short block
    ([5, 6] + list(range(100, 112)) * 3, True),  # a 12-token sentence three times
    (list(range(40)), False),
    ([1, 2] * 5, False),  # too short to call
    ([1, 2, 3] * 8 + [9], False),  # broken out of at the end
])
def test_loop_detection(tokens: list[int], loops: bool) -> None:
    assert sig.ends_in_loop(tokens) is loops


def watch(task: str = "classify", window: int = 100, **settings: float) -> DriftWatch:
    return DriftWatch("m", task, Settings(drift_window=window, **settings), ["neg", "pos"],
                      unknown_id=100)


def feed_labels(w: DriftWatch, pos_share: float, n: int, top: float = 0.9) -> None:
    rng = np.random.default_rng(int(pos_share * 1000) + n)
    for _ in range(n):
        k = int(rng.random() < pos_share)
        probs = np.array([[1 - top, top]]) if k else np.array([[top, 1 - top]])
        w.observe_labels(probs)
        w.observe_texts([12], [0], [False], [False])


def state(w: DriftWatch) -> dict[str, tuple[float | None, bool]]:
    signals, _ = w.evaluate()
    return {s.name: (s.score, s.alert) for s in signals}


def test_first_window_is_the_baseline_then_a_label_swing_alerts_and_clears(
        caplog: pytest.LogCaptureFixture) -> None:
    w = watch()
    feed_labels(w, 0.5, 60)
    s = state(w)
    assert s["label_js"][0] is None and not w.baseline_ready(True)  # still the baseline
    assert s["dominant_label"][0] is not None  # absolute: needs no baseline
    feed_labels(w, 0.5, 40)
    assert w.baseline_ready(True)
    assert not any(alert for _, alert in state(w).values())
    caplog.set_level(logging.WARNING, "sureserve.drift")
    feed_labels(w, 1.0, 100)  # every answer is "pos"
    s = state(w)
    assert s["label_js"][1] and s["dominant_label"][1]
    assert s["dominant_label"][0] == pytest.approx(1.0)
    started = [r for r in caplog.records if "drift alert on" in r.message]
    assert {r.message.split(": ")[1].split(" =")[0] for r in started} >= {"label_js",
                                                                          "dominant_label"}
    state(w)  # evaluating again does not log again
    assert len([r for r in caplog.records if "drift alert on" in r.message]) == len(started)
    feed_labels(w, 0.5, 100)  # ordinary traffic for one window
    s = state(w)
    assert not s["label_js"][1] and not s["dominant_label"][1]
    assert any("cleared" in r.message for r in caplog.records)
    assert w.info()["label_mix"]["window"]["pos"] == pytest.approx(0.5, abs=0.15)


def test_hysteresis_keeps_an_alert_until_well_below() -> None:
    w = watch(drift_label_share=0.8)
    feed_labels(w, 0.5, 100)
    feed_labels(w, 0.85, 100)
    assert state(w)["dominant_label"][1]
    feed_labels(w, 0.5, 30)  # share falls to ~0.75: below 0.8, above 0.8 * 0.8
    score, alert = state(w)["dominant_label"]
    assert score is not None and 0.64 < score < 0.8 and alert


def test_a_one_sided_baseline_is_not_alerted_on() -> None:
    w = watch()
    feed_labels(w, 1.0, 100)
    feed_labels(w, 1.0, 50)
    score, alert = state(w)["dominant_label"]
    assert score == 0.0 and not alert


def test_unknown_tokens_compare_with_the_probe_anchor_before_the_baseline() -> None:
    anchor = Stats()
    anchor.add_text(100, 0, False, False)
    w = DriftWatch("m", "embed", Settings(drift_window=100), unknown_id=1, anchor=anchor)
    w.observe_texts([10] * 30, [5] * 30, [False] * 30, [False] * 30)
    s = {x.name: x for x in w.evaluate()[0]}
    assert s["unknown_tokens"].alert and "gate probe texts" in s["unknown_tokens"].detail
    assert s["cut_share"].score is None and "baseline" in s["cut_share"].detail


def test_reference_recording_goes_to_the_baseline_only() -> None:
    w = watch()
    with w.recording("ref.txt"):
        feed_labels(w, 0.5, 40)
    assert w.baseline_ready(True) and w.baseline.inputs == 40
    assert w.info()["window_inputs"] == 0 and w.baseline_label() == "reference ref.txt"
    feed_labels(w, 1.0, 30)
    assert state(w)["label_js"][1]


def test_embedding_collapse_and_generation_signals() -> None:
    rng = np.random.default_rng(1)
    w = DriftWatch("m", "embed", Settings(drift_window=50))
    w.observe_vectors(rng.normal(size=(50, 32)))
    w.observe_texts([9] * 50, [0] * 50, [False] * 50, [False] * 50)
    base = np.ones(32)
    w.observe_vectors(base + 0.01 * rng.normal(size=(50, 32)))  # near-duplicates
    w.observe_texts([9] * 50, [0] * 50, [False] * 50, [False] * 50)
    s = state(w)
    assert s["collapse"][1] and s["mean_shift"][1]
    g = DriftWatch("m", "generate", Settings(drift_window=20))
    for k in range(20):
        g.observe_completion("stop", f"answer {k}", list(range(k, k + 10)))
        g.observe_texts([5], [0], [False], [False])
    for _ in range(20):
        g.observe_completion("length", "no no no", [3] * 30)
        g.observe_completion("cancelled", "", [])  # the client's doing: not counted
        g.observe_texts([5], [0], [False], [False])
    s = state(g)
    assert s["loops"][1] and s["finish_js"][1] and not s["empty_outputs"][1]
    assert s["loops"][0] == pytest.approx(1.0)
