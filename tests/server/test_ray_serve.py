"""``sureserve serve --ray``: Ray Serve replicas answer as the local server does, and a
SIGTERM leaves no Ray process behind."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

from tests.server.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.e2e
TEXTS = ["The film was a delight from start to finish.", "Rates rose on Tuesday.", "ok"]


def test_ray_serve_answers_like_the_local_server_and_shuts_down_clean(server: Server) -> None:
    ray_server = start_server(["minilm", "sentiment-demo", "--ray", "--replicas", "2"], {},
                              ready_timeout=300)
    try:
        children = psutil.Process(ray_server.proc.pid).children(recursive=True)
        assert any("raylet" in (p.name() or "") for p in children)
        for route, body in (("/embed", {"inputs": TEXTS}),
                            ("/predict", {"inputs": TEXTS, "model": "sentiment-demo"}),
                            ("/v1/embeddings", {"input": TEXTS, "model": "minilm"})):
            for _ in range(4):  # requests spread over both replicas
                a = httpx.post(f"{server.url}{route}", json=body, timeout=120)
                b = httpx.post(f"{ray_server.url}{route}", json=body, timeout=120)
                assert a.status_code == b.status_code == 200, (route, b.text)
                _close(a.json(), b.json())
        r = httpx.post(f"{ray_server.url}/embed", json={"inputs": [""]})
        assert r.status_code == 422 and r.json()["error_type"] == "invalid_input"
    finally:
        code = stop_server(ray_server)
    assert code == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p.is_running() and p.status() !=
                                              psutil.STATUS_ZOMBIE for p in children):
        time.sleep(0.5)
    left = [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"Ray processes left behind: {left}"


def _close(a: object, b: object) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k not in ("created", "id"):
                _close(a[k], b[k])
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) < 1e-4, (a, b)
    else:
        assert a == b, (a, b)
