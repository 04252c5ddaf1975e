"""Isolation of a poisoned input, graceful shutdown, and the OpenAPI schema (schemathesis)."""

from __future__ import annotations

import concurrent.futures as cf
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

import sureserve
from sureserve.settings import Settings
from tests.server.conftest import Server, serve_here, stop_server

pytestmark = pytest.mark.e2e


def _poisoned_factory(name: str, settings: Settings) -> Any:
    """minilm whose forward pass (padded or packed) raises whenever a batch holds the word
    'poison'."""
    engine = sureserve.load(name, settings=settings)
    poison = engine.tokenizer("poison", add_special_tokens=False)["input_ids"][0]
    task = engine.task

    def poisoned(real: Any) -> Any:
        def forward(pieces: Any, *args: Any) -> Any:
            if any(poison in p.ids for p in pieces):
                raise RuntimeError("poisoned input")
            return real(pieces, *args)
        return forward

    task.forward = poisoned(task.forward)
    task.forward_packed = poisoned(task.forward_packed)
    return engine


RELEASE = threading.Event()  # the model "loads" only once a test sets it


def _held_factory(name: str, settings: Settings) -> Any:
    RELEASE.wait(120)
    return _poisoned_factory(name, settings)


def _still_loading(url: str) -> None:
    """Requests while the model loads get their own "not ready" answer, not an internal
    error; then the model may finish loading."""
    r = httpx.post(f"{url}/embed", json={"inputs": "hello"})
    assert r.status_code == 503 and r.json()["error_type"] == "model_not_ready", r.text
    RELEASE.set()


@pytest.fixture(scope="module")
def poisoned() -> Iterator[str]:
    # a long wait for company so that all concurrent requests land in one batch
    with serve_here(["minilm"], factory=_held_factory, while_loading=_still_loading,
                    max_wait_ms=300) as s:
        yield s.url


def test_a_client_that_leaves_is_counted_as_499(poisoned: str) -> None:
    def gone() -> float:
        m = re.search(r'^sureserve_requests_total\{route="/embed",status="499"\} (\S+)$',
                      httpx.get(f"{poisoned}/metrics").text, re.M)
        return float(m.group(1)) if m else 0.0

    before = gone()
    with pytest.raises(httpx.TimeoutException):  # a lone request waits 300 ms for company
        httpx.post(f"{poisoned}/embed", json={"inputs": ["bye"]}, timeout=0.05)
    for _ in range(50):
        if gone() == before + 1:
            break
        time.sleep(0.1)
    assert gone() == before + 1


def test_poisoned_input_is_isolated_from_its_batch(poisoned: str) -> None:
    texts = ["a calm morning", "poison in the well", "markets closed higher", "hello"]

    def one(t: str) -> httpx.Response:
        return httpx.post(f"{poisoned}/embed", json={"inputs": [t]}, timeout=60)

    with cf.ThreadPoolExecutor(len(texts)) as pool:
        results = list(pool.map(one, texts))
    assert [r.status_code for r in results] == [200, 500, 200, 200]
    assert results[1].json()["error_type"] == "inference_failed"
    ref = sureserve.load("minilm").embed([t for t in texts if "poison" not in t])
    got = np.array([r.json()[0] for r in results if r.status_code == 200])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    batches = httpx.get(f"{poisoned}/metrics").text
    assert "sureserve_batch_size_count" in batches


def test_sigterm_finishes_in_flight_requests_then_exits_0(server: Server) -> None:
    """The suite's last test (tests/conftest.py orders it so): it stops the session's server
    (a server process of its own cost ~7 s of start-up). Three requests of 16 texts: the
    server's queue bound (48 inputs) holds them all."""
    s = server
    texts = ["a sentence that takes a little while to embed " * 20] * 16

    def one(_: int) -> int:
        return httpx.post(f"{s.url}/embed", json={"inputs": texts}, timeout=120).status_code

    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(one, i) for i in range(3)]
        time.sleep(0.2)  # requests are in flight
        assert s.proc.poll() is None and not all(f.done() for f in futures)
        code = stop_server(s)
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 3
    assert code == 0


def test_openapi_schema_with_schemathesis(server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/embed", "/predict", "/tokenize", "/info", "/health", "/v1/embeddings",
            "/v1/models", "/", "/invocations", "/ping", "/embeddings", "/similarity",
            "/embed_all", "/decode", "/rerank", "/v1/rerank"} <= set(schema["paths"])
    r = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
         "--max-examples", "15", "--checks", "not_a_server_error,status_code_conformance,"
         "content_type_conformance,response_schema_conformance",
         "--generation-deterministic", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
