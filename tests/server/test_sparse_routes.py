"""POST /embed_sparse in TEI's shape, POST / and /invocations for a sparse model, and the
errors a sparse request to a dense model (and the reverse) gets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import sureserve
from tests.server.conftest import LocalServer, serve_here

pytestmark = pytest.mark.e2e

TEXTS = ["The cat sat on the mat and purred.", "Rates rose on Tuesday."]


@pytest.fixture(scope="module")
def sparse_server() -> Iterator[LocalServer]:
    """splade-tiny first: the default model, so POST / gives sparse vectors."""
    with serve_here(["splade-tiny", "minilm"], max_client_batch=16) as s:
        yield s


@pytest.fixture(scope="module")
def splade() -> Any:
    return sureserve.load("splade-tiny", drift_watch=False)


def _post(server: LocalServer, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


def test_embed_sparse_is_teis_shape_and_equals_the_python_api(sparse_server: LocalServer,
                                                              splade: Any) -> None:
    r = _post(sparse_server, "/embed_sparse", {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    got = r.json()
    want = splade.embed_sparse(TEXTS)
    assert len(got) == 2 and all(set(t) == {"index", "value"} for t in got[0])
    for g, w in zip(got, want, strict=True):
        assert [t["index"] for t in g] == [t["index"] for t in w]
        assert [t["value"] for t in g] == pytest.approx([t["value"] for t in w], abs=1e-5)
    # a single string; sureserve's top_k and return_tokens, top level or in parameters
    one = _post(sparse_server, "/embed_sparse", {"inputs": TEXTS[0], "top_k": 3,
                                                 "return_tokens": True}).json()
    assert [t["token"] for t in one[0]] == [t["token"] for t in
                                            splade.embed_sparse(TEXTS[:1], tokens=True)[0][:3]]
    same = _post(sparse_server, "/embed_sparse",
                 {"inputs": [TEXTS[0]], "parameters": {"top_k": 3, "return_tokens": True}})
    assert same.json() == one
    for route in ("/", "/invocations"):
        r = _post(sparse_server, route, {"inputs": TEXTS})
        assert r.status_code == 200 and r.json() == got, (route, r.text)


def test_sparse_limits_and_wrong_routes_name_what_to_do(sparse_server: LocalServer) -> None:
    long = "word " * 600
    r = _post(sparse_server, "/embed_sparse", {"inputs": [long]})
    assert r.status_code == 413 and r.json()["error_type"] == "input_too_long"
    assert _post(sparse_server, "/embed_sparse", {"inputs": [long], "truncate": True}
                 ).status_code == 200
    for body, status, needle in (
            ({"inputs": ["ok", ""]}, 422, "empty"),
            ({"inputs": ["ok"], "top_k": -1}, 422, "top_k"),
            ({"inputs": ["ok"], "parameters": {"top_k": -2}}, 422, "top_k"),
            ({"inputs": ["ok"], "parameters": {"normalize": True}}, 422, "normalize"),
            ({"inputs": ["ok"], "truncation_direction": "up"}, 422, "truncation_direction"),
            ({"inputs": ["x"] * 17}, 413, "SURESERVE_MAX_CLIENT_BATCH"),
            # a sparse request to a dense model names the dense model's routes
            ({"inputs": ["ok"], "model": "minilm"}, 400, "/embed or /v1/embeddings")):
        r = _post(sparse_server, "/embed_sparse", body)
        assert r.status_code == status, (body, r.text)
        assert needle in r.text, (body, r.text)
    # and the reverse: dense routes on the sparse model point to /embed_sparse
    for route, body in (("/embed", {"inputs": ["ok"], "model": "splade-tiny"}),
                        ("/v1/embeddings", {"input": ["ok"], "model": "splade-tiny"})):
        r = _post(sparse_server, route, body)
        assert 400 <= r.status_code < 500 and "/embed_sparse" in r.text, (route, r.text)
    # the server is still fine for everyone else
    assert _post(sparse_server, "/embed", {"inputs": ["ok"]}).status_code == 200
    info = httpx.get(f"{sparse_server.url}/info").json()
    models = {m["name"]: m for m in info["models"]}
    assert models["splade-tiny"]["task"] == "sparse" and models["splade-tiny"]["gate_passed"]
