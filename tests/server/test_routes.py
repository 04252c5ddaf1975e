"""Every route of the real server over loopback HTTP, and every input limit."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import re
import socket
import time

import httpx
import numpy as np
import pytest

import sureserve
from tests.server.conftest import LocalServer, Server

pytestmark = pytest.mark.e2e

TEXTS = ["The film was a delight from start to finish.", "Rates rose on Tuesday.", "ok"]


@pytest.fixture(scope="module")
def minilm() -> sureserve.Engine:
    return sureserve.load("minilm")


def test_health_and_info(server: Server) -> None:
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    info = httpx.get(f"{server.url}/info").json()
    assert info["model_id"] == "minilm" and info["max_client_batch_size"] == 16
    assert {m["name"] for m in info["models"]} == {"minilm", "sentiment-demo", "rerank-demo"}
    assert all(m["gate_passed"] for m in info["models"])
    models = {m["name"]: m for m in info["models"]}
    # packing passed its check for the embedder; a classifier's head is not packed
    assert models["minilm"]["packed_batches"] is True
    assert models["sentiment-demo"]["packed_batches"] is False
    assert models["rerank-demo"]["task"] == "rerank" and models["rerank-demo"]["labels"] is None
    assert models["minilm"]["forward_workers"] >= 1
    assert models["minilm"]["precision"] == "float32"
    assert models["minilm"]["quantization_evaluated"] is None
    assert isinstance(models["minilm"]["warnings"], list)
    # the GELU inside the packed product: per feed-forward block (6 in minilm), only where a
    # layer is packed and the load's probe agreed bit for bit (this machine's verdict)
    for name in ("minilm", "rerank-demo"):
        packing = models[name]["packed_linear"]
        assert packing["fused_gelu"] in (0, 6), packing
        assert packing["fused_gelu"] == 0 or packing["packed_layers"] >= 6, packing


def test_embed_matches_offline(server: Server, minilm: sureserve.Engine) -> None:
    r = httpx.post(f"{server.url}/embed", json={"inputs": TEXTS})
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json()), minilm.embed(TEXTS), atol=1e-5)
    one = httpx.post(f"{server.url}/embed", json={"inputs": TEXTS[0]}).json()
    assert len(one) == 1 and len(one[0]) == 384


def test_predict_single_and_batch(server: Server) -> None:
    r = httpx.post(f"{server.url}/predict", json={"inputs": "A wonderful, moving film."})
    assert r.status_code == 200
    body = r.json()
    assert body[0]["label"] == "POSITIVE" and abs(sum(d["score"] for d in body) - 1) < 1e-6
    r = httpx.post(f"{server.url}/predict", json={"inputs": ["Awful.", "Superb!"],
                                                  "raw_scores": True})
    assert [x[0]["label"] for x in r.json()] == ["NEGATIVE", "POSITIVE"]


def test_tokenize(server: Server) -> None:
    r = httpx.post(f"{server.url}/tokenize", json={"inputs": "Hello world"})
    toks = r.json()[0]
    assert [t["text"] for t in toks] == ["[CLS]", "hello", "world", "[SEP]"]
    assert toks[0]["special"] and toks[1]["start"] == 0 and toks[1]["stop"] == 5


def test_openai_embeddings_with_the_official_client(server: Server,
                                                    minilm: sureserve.Engine) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    res = client.embeddings.create(model="minilm", input=TEXTS)
    got = np.array([d.embedding for d in res.data])
    np.testing.assert_allclose(got, minilm.embed(TEXTS), atol=1e-5)
    assert res.usage.prompt_tokens > 0
    models = [m.id for m in client.models.list()]
    assert models == ["minilm", "sentiment-demo", "rerank-demo"]


def test_openai_base64(server: Server, minilm: sureserve.Engine) -> None:
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": "hi there",
                                                        "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, minilm.embed(["hi there"])[0], atol=1e-5)


def test_metrics(server: Server) -> None:
    httpx.post(f"{server.url}/embed", json={"inputs": TEXTS})
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("sureserve_requests_total", "sureserve_request_duration_seconds",
                 "sureserve_queue_time_seconds", "sureserve_inference_time_seconds",
                 "sureserve_batch_size", "sureserve_batch_tokens", "sureserve_padding_share",
                 "sureserve_queue_depth", "sureserve_truncated_inputs_total",
                 "sureserve_gate_passed", "sureserve_event_loop_lag_seconds"):
        assert name in text, name
    assert 'route="/embed",status="200"' in text


@pytest.mark.parametrize("payload,status,needle,kind", [
    ({"inputs": ["x"] * 17}, 413, "SURESERVE_MAX_CLIENT_BATCH", "too_many_inputs"),
    ({"inputs": []}, 422, "empty", "invalid_input"),
    ({"inputs": ""}, 422, "empty", "invalid_input"),
    ({"inputs": 5}, 422, "inputs", "invalid_input"),
    ({"inputs": ["ok", None]}, 422, "inputs", "invalid_input"),
    ({"text": "wrong field"}, 422, "inputs", "invalid_input"),
    ({"inputs": "x", "model": "nope"}, 404, "not served", "model_not_found"),
    ({"inputs": "x", "model": "sentiment-demo"}, 400, "classify", "task_mismatch"),
])
def test_input_errors_name_the_problem(server: Server, payload: dict[str, object], status: int,
                                       needle: str, kind: str) -> None:
    r = httpx.post(f"{server.url}/embed", json=payload)
    assert r.status_code == status, r.text
    body = r.json()
    assert needle in body["error"] + body.get("fix", "")
    assert body["error_type"] == kind


def _truncated_count(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^sureserve_truncated_inputs_total (\S+)$", text, re.M)
                 .group(1))  # type: ignore[union-attr]


def test_too_long_input_is_413_unless_truncate(server: Server) -> None:
    long = "word " * 400
    before = _truncated_count(server)
    r = httpx.post(f"{server.url}/embed", json={"inputs": [long]})
    assert r.status_code == 413 and r.json()["error_type"] == "input_too_long"
    assert "256" in r.json()["error"] and "truncate" in r.json()["fix"]
    assert _truncated_count(server) == before  # refused, not cut
    r = httpx.post(f"{server.url}/embed", json={"inputs": [long, "short"], "truncate": True})
    assert r.status_code == 200
    assert _truncated_count(server) == before + 1  # exactly the one long input


def test_predict_carries_truncation_flags_like_the_python_api(server: Server) -> None:
    long = "What a wonderful, moving film. " * 100
    r = httpx.post(f"{server.url}/predict", json={"inputs": [long, "Superb!"],
                                                  "truncate": True})
    assert r.status_code == 200
    first, second = r.json()
    assert all(d["truncated"] is True and d["chunks"] == 1 for d in first)
    assert all(d["truncated"] is False for d in second)
    api = sureserve.load("sentiment-demo").classify([long, "Superb!"], truncation="truncate",
                                                    top_k=None)
    assert [[d["label"] for d in x] for x in api] == [[d["label"] for d in x] for x in r.json()]
    np.testing.assert_allclose([d["score"] for d in first], [d["score"] for d in api[0]],
                               atol=1e-5)
    plain = httpx.post(f"{server.url}/predict", json={"inputs": "Superb!"}).json()
    assert "truncated" not in plain[0]  # no cutting allowed: no flags, TEI's exact shape


def test_payload_limit(server: Server) -> None:
    r = httpx.post(f"{server.url}/embed", json={"inputs": ["a" * 70000]})
    assert r.status_code == 413 and "SURESERVE_MAX_PAYLOAD_BYTES" in r.json()["fix"]
    assert r.json()["error_type"] == "invalid_input"


def _raw_post(url: str, head: bytes, chunks: list[bytes], then: bytes = b"") -> list[bytes]:
    """Send a request in pieces on one connection (a pause between pieces, so the server
    answers while the body is still arriving), then ``then``; returns the raw answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for c in chunks:
            sock.sendall(c)
            time.sleep(0.002)
        answers = [_read_answer(sock)]
        if then:
            sock.sendall(then)
            answers.append(_read_answer(sock))
    return answers


def _read_answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"!"
        assert not data.endswith(b"!"), "the server closed the connection without answering"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_an_oversized_body_gets_the_413_not_a_reset(server: Server) -> None:
    """A body over the limit, declared by Content-Length, still being sent when the server
    decides: the client reads the documented 413 JSON (it used to get a connection reset
    now and then), and the connection stays usable for the next request."""
    body = json.dumps({"inputs": ["a" * 1000] * 600}).encode()  # 600 kB vs a 60 kB limit
    head = (f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    ok = json.dumps({"inputs": "fine"}).encode()
    then = (f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(ok)}\r\n\r\n").encode() + ok
    pieces = [body[i:i + 16384] for i in range(0, len(body), 16384)]
    for _ in range(3):
        big, small = _raw_post(server.url, head, pieces, then)
        assert big.startswith(b"HTTP/1.1 413"), big[:200]
        assert b"SURESERVE_MAX_PAYLOAD_BYTES" in big
        assert small.startswith(b"HTTP/1.1 200"), small[:200]
    # a client that will close after this request: the server used to close at once,
    # with the body still arriving, so the client's next write or read met a reset
    closing = head.replace(b"Content-Type:", b"Connection: close\r\nContent-Type:")
    for _ in range(3):
        (big,) = _raw_post(server.url, closing, pieces)
        assert big.startswith(b"HTTP/1.1 413"), big[:200]


def test_an_oversized_chunked_body_gets_the_413(server: Server) -> None:
    body = json.dumps({"inputs": ["a" * 1000] * 600}).encode()
    head = (b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunks = [b"%x\r\n%s\r\n" % (len(body[i:i + 16384]), body[i:i + 16384])
              for i in range(0, len(body), 16384)] + [b"0\r\n\r\n"]
    (answer,) = _raw_post(server.url, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413") and b"SURESERVE_MAX_PAYLOAD_BYTES" in answer


def test_malformed_json_and_invalid_utf8(server: Server) -> None:
    for raw in (b'{"inputs": ', b'{"inputs": "\xff\xfe"}'):
        r = httpx.post(f"{server.url}/embed", content=raw,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "JSON" in r.json()["error"] and r.json()["error_type"] == "invalid_input"


def test_openai_error_shape(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": []})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_input"


def test_token_ids_on_openai_embeddings_are_refused_with_the_reason(server: Server) -> None:
    """LangChain's OpenAIEmbeddings sends tiktoken ids by default: embedding them with
    another model's tokenizer would be silently wrong, so they get a 422 naming the client
    setting that sends text."""
    for ids in ([[9906, 1917]], [9906, 1917]):
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": ids})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert "token ids" in err["message"] and "check_embedding_ctx_length=False" in \
            err["message"] and err["type"] == "invalid_input", err
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["a text", 3]})
    assert r.status_code == 422


def test_flood_gets_429_while_accepted_requests_succeed(server: Server) -> None:
    texts = ["a fairly ordinary sentence about the weather " * 4] * 16

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}/embed", json={"inputs": texts}, timeout=120)

    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(48)))
    codes = [r.status_code for r in results]
    assert 429 in codes and 200 in codes
    assert set(codes) <= {200, 429}
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "SURESERVE_MAX_QUEUE_INPUTS" in r.json()["fix"]
            assert r.json()["error_type"] == "overloaded"
        else:
            assert len(r.json()) == 16


def test_api_key(keyed_server: LocalServer) -> None:
    url = keyed_server.url
    r = httpx.post(f"{url}/embed", json={"inputs": "x"})
    assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
    r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    wrong = {"authorization": "Bearer nope"}
    assert httpx.post(f"{url}/embed", json={"inputs": "x"}, headers=wrong).status_code == 401
    ok = {"authorization": "Bearer s3cret"}
    assert httpx.post(f"{url}/embed", json={"inputs": "x"}, headers=ok).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # open by default
    assert httpx.get(f"{url}/metrics").status_code == 200
