"""The drift watch on a served model: ordinary traffic stays quiet, unreadable text, a
one-sided label mix and boilerplate raise their alerts within one window, and they clear."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from sureserve.bench.drift import boilerplate, unreadable
from sureserve.settings import Settings
from sureserve.zoo.corpora import load_vader
from tests.server.conftest import LocalServer, serve_here

pytestmark = pytest.mark.e2e
WINDOW = 100


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    rows = load_vader("movieReviewSnippets")
    random.Random(3).shuffle(rows)
    return {"ordinary": [r.text for r in rows[:600]],
            "negative": [r.text for r in rows if r.score < -2.5][:200]}


@pytest.fixture(scope="module")
def watched(logged: list[str]) -> Iterator[LocalServer]:
    """In this process: the watch is the app's, and a process of its own adds only start-up."""
    with serve_here(["sentiment-demo", "minilm"], drift_window=WINDOW) as s:
        yield s


@pytest.fixture(scope="module")
def logged() -> Iterator[list[str]]:
    """What the drift watch logged while this module's server ran (its warnings, as a
    server process writes them to its log)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logging.getLogger("sureserve.drift").addHandler(handler)
    yield lines
    logging.getLogger("sureserve.drift").removeHandler(handler)


def send(server: LocalServer, model: str, texts: list[str], route: str = "/predict") -> None:
    for k in range(0, len(texts), 20):
        r = httpx.post(f"{server.url}{route}", json={"inputs": texts[k:k + 20],
                                                     "model": model}, timeout=60)
        assert r.status_code == 200, r.text


def alerts(server: LocalServer, model: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{server.url}/health").json()
    return {a["signal"]: a for a in body["drift"] if a["model"] == model}


def drift_info(server: LocalServer, model: str) -> dict[str, Any]:
    """The model's drift section of /info."""
    return dict(next(m for m in httpx.get(f"{server.url}/info").json()["models"]
                     if m["name"] == model)["drift"])


def signals(server: LocalServer, model: str) -> list[dict[str, Any]]:
    info = drift_info(server, model)
    return list(info["signals"]) if info["baseline_ready"] else [{"score": None}]


def wait_until(check: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False


def gauge(server: LocalServer, name: str, model: str, signal: str) -> float | None:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf'^{name}\{{model="{model}",signal="{signal}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_classifier_drift_alerts_start_and_clear(watched: LocalServer,
                                                 texts: dict[str, list[str]]) -> None:
    ordinary = iter(texts["ordinary"])
    model = "sentiment-demo"
    send(watched, model, [next(ordinary) for _ in range(2 * WINDOW)])  # baseline + a window
    # the server evaluates every second: wait for one that has scored the window (instead of
    # a fixed 2.5 s), then one more, so that the checks below read a settled evaluation
    assert wait_until(lambda: all(s["score"] is not None for s in signals(watched, model)))
    time.sleep(1.1)
    health = httpx.get(f"{watched.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    info = drift_info(watched, model)
    assert info["baseline_ready"] and info["baseline"] == f"first {WINDOW} inputs of traffic"
    assert {s["signal"] for s in info["signals"]} >= {"unknown_tokens", "label_js",
                                                       "dominant_label", "length_psi"}
    assert all(s["score"] is not None and not s["alert"] for s in info["signals"])
    assert gauge(watched, "sureserve_drift_alert", model, "label_js") == 0

    # text the tokenizer cannot read: the unknown-token alert within one window
    send(watched, model, unreadable(WINDOW))
    assert wait_until(lambda: "unknown_tokens" in alerts(watched, model)), \
        httpx.get(f"{watched.url}/health").text
    health = httpx.get(f"{watched.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert gauge(watched, "sureserve_drift_alert", model, "unknown_tokens") == 1
    score = gauge(watched, "sureserve_drift_score", model, "unknown_tokens")
    assert score is not None and score > 0.02

    # ordinary traffic returns: cleared within one window
    send(watched, model, [next(ordinary) for _ in range(WINDOW)])
    assert wait_until(lambda: not alerts(watched, model))
    assert httpx.get(f"{watched.url}/health").json()["status"] == "ok"

    # only strongly negative reviews: the label mix alert
    send(watched, model, texts["negative"][:WINDOW])
    assert wait_until(lambda: bool({"label_js", "dominant_label"} & set(alerts(watched,
                                                                                model))))
    got = alerts(watched, model)
    assert "NEGATIVE" in (got.get("dominant_label") or got["label_js"])["detail"]
    send(watched, model, [next(ordinary) for _ in range(WINDOW)])
    assert wait_until(lambda: not alerts(watched, model))


def test_embedding_collapse_alert(watched: LocalServer, texts: dict[str, list[str]]) -> None:
    model = "minilm"
    send(watched, model, texts["ordinary"][-2 * WINDOW:], "/embed")
    assert wait_until(lambda: all(s["score"] is not None for s in signals(watched, model)))
    time.sleep(1.1)  # one more evaluation of the same window
    assert not alerts(watched, model)
    send(watched, model, boilerplate(WINDOW), "/embed")
    assert wait_until(lambda: "collapse" in alerts(watched, model)), \
        httpx.get(f"{watched.url}/health").text
    assert "mean pairwise cosine" in alerts(watched, model)["collapse"]["detail"]


def test_blank_inputs_are_refused_and_counted(watched: LocalServer) -> None:
    model = "minilm"
    for k in range(WINDOW // 10):  # a client that starts sending blanks
        r = httpx.post(f"{watched.url}/embed", json={"inputs": [f"fine {k}", "   "],
                                                     "model": model})
        assert r.status_code == 422 and "input 1 is empty" in r.json()["error"]
    assert wait_until(lambda: "empty_inputs" in alerts(watched, model)), \
        httpx.get(f"{watched.url}/health").text
    # the alert starts at the evaluation that first sees 5% blanks, which on a slow machine
    # can fall while the requests above are still arriving (0.08 was read once); the score
    # of every blank sent is the next evaluation's
    assert wait_until(lambda: alerts(watched, model).get("empty_inputs", {})
                      .get("score", 0) >= 0.09), alerts(watched, model)


def test_alerts_are_logged_once_when_they_start_and_once_when_they_clear(
        watched: LocalServer, logged: list[str]) -> None:
    log = "\n".join(logged)  # last test of the module: what the watch logged so far
    started = re.findall(r"drift alert on sentiment-demo: unknown_tokens", log)
    cleared = re.findall(r"drift alert cleared on sentiment-demo: unknown_tokens", log)
    assert len(started) == 1 and len(cleared) == 1, log[-3000:]


def test_drift_unhealthy_answers_503() -> None:
    from sureserve.server.http import health_response

    alert = {"model": "m", "signal": "collapse", "score": 0.9, "threshold": 0.5,
             "alert": True, "detail": "mean pairwise cosine 0.95"}
    for unhealthy, code in ((False, 200), (True, 503)):
        state = SimpleNamespace(status="degraded", slots={}, drift_alerts=lambda: [alert],
                                settings=Settings(drift_unhealthy=unhealthy))
        r = health_response(state)
        assert r.status_code == code and b'"degraded"' in r.body
