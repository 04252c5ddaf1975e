"""Real clients, unchanged, against the real server: huggingface_hub's InferenceClient at
the base URL (with and without parameters), the openai client on the /embeddings alias,
TEI's remaining routes with httpx, and /docs rendered offline in a headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from openai import OpenAI

from tests.server.conftest import LocalServer, Server

pytestmark = pytest.mark.e2e

TEXTS = ["The film was a delight from start to finish.", "Rates rose on Tuesday."]


def _embed(url: str, **body: object) -> np.ndarray:
    r = httpx.post(f"{url}/embed", json={"inputs": TEXTS[0], **body}, timeout=60)
    assert r.status_code == 200, r.text
    return np.asarray(r.json(), dtype=np.float32)


def test_inference_client_feature_extraction(server: Server) -> None:
    client = InferenceClient(server.url)
    got = client.feature_extraction(TEXTS[0])
    np.testing.assert_allclose(got, _embed(server.url), atol=1e-6)
    raw = client.feature_extraction(TEXTS[0], normalize=False, truncate=True,
                                    truncation_direction="right")
    np.testing.assert_allclose(raw, _embed(server.url, normalize=False), atol=1e-6)
    assert abs(float(np.linalg.norm(raw)) - 1) > 1e-3  # normalize=False was honoured
    with pytest.raises(HfHubHTTPError) as exc:
        client.feature_extraction(TEXTS[0], prompt_name="query")
    assert exc.value.response.status_code == 422 and "prompt_name" in exc.value.response.text
    # a cut from the left keeps the text's end: the same vector as the end alone
    words = ["football"] * 200 + ["bank"] * 200
    left = client.feature_extraction(" ".join(words), truncate=True,
                                     truncation_direction="left")
    end = client.feature_extraction(" ".join(words[-254:]))  # minilm: 256 with [CLS] [SEP]
    right = client.feature_extraction(" ".join(words), truncate=True)
    np.testing.assert_allclose(left, end, atol=1e-5)
    assert float(np.abs(np.asarray(left) - np.asarray(right)).max()) > 1e-2


def test_inference_client_sentence_similarity(server: Server) -> None:
    client = InferenceClient(server.url)
    scores = client.sentence_similarity("A man is eating food.", [
        "A man is eating a piece of bread.", "The stock market fell sharply today."])
    vecs = np.asarray(httpx.post(f"{server.url}/embed", json={"inputs": [
        "A man is eating food.", "A man is eating a piece of bread.",
        "The stock market fell sharply today."]}).json())
    np.testing.assert_allclose(scores, vecs[1:] @ vecs[0], atol=1e-5)
    assert scores[0] > scores[1] + 0.3
    same = httpx.post(f"{server.url}/similarity", json={"inputs": {
        "source_sentence": "A man is eating food.",
        "sentences": ["A man is eating a piece of bread."]}}).json()
    assert same == pytest.approx(scores[:1], abs=1e-6)


def test_inference_client_text_classification(cls_server: LocalServer) -> None:
    client = InferenceClient(cls_server.url)
    out = client.text_classification("what a great film")
    assert [o.label for o in out] == ["POSITIVE", "NEGATIVE"]
    assert sum(o.score for o in out) == pytest.approx(1, abs=1e-5)
    top = client.text_classification("what a great film", top_k=1)
    assert len(top) == 1 and top[0].label == "POSITIVE"
    raw = client.text_classification("what a great film", function_to_apply="none")
    logits = httpx.post(f"{cls_server.url}/predict", json={"inputs": "what a great film",
                                                            "raw_scores": True}).json()
    assert [o.score for o in raw] == pytest.approx([d["score"] for d in logits], abs=1e-5)
    # pointed at /predict itself, as the user tried: the parameters object is fine
    at_predict = InferenceClient(f"{cls_server.url}/predict").text_classification("awful")
    assert at_predict[0].label == "NEGATIVE"


def test_invocations_and_ping_and_the_flat_tei_shape(cls_server: LocalServer) -> None:
    url = cls_server.url
    tei = httpx.post(f"{url}/", json={"inputs": "what a great film"}).json()
    assert isinstance(tei[0], dict) and tei[0]["label"] == "POSITIVE"  # TEI: flat for a str
    assert httpx.post(f"{url}/invocations", json={"inputs": "what a great film"}).json() == tei
    assert httpx.get(f"{url}/ping").status_code == 200
    # the body's model picks another served model's task
    vec = httpx.post(f"{url}/", json={"inputs": "hi", "model": "minilm"}).json()
    assert len(vec) == 1 and len(vec[0]) == 384


@pytest.mark.parametrize("body,needle", [
    ({"inputs": "x", "parameters": {"temperature": 0.5}}, "'temperature'"),
    ({"inputs": "x", "normalize": True, "parameters": {"normalize": False}}, "normalize"),
    ({"inputs": "x", "parameters": {"dimensions": 12}}, "dimensions=12"),
    ({"inputs": "x", "top_k": 2}, "top_k"),  # a classification option on an embedding model
])
def test_options_that_would_change_the_answer_are_refused_by_name(
        server: Server, body: dict[str, object], needle: str) -> None:
    r = httpx.post(f"{server.url}/", json=body)
    assert r.status_code == 422 and needle in r.text, r.text


def test_null_parameters_mean_not_set(server: Server) -> None:
    got = httpx.post(f"{server.url}/embed", json={"inputs": TEXTS[0], "parameters": {
        "normalize": None, "truncate": None, "prompt_name": None}}).json()
    np.testing.assert_allclose(got, _embed(server.url), atol=1e-6)


def test_openai_client_on_the_embeddings_alias(server: Server) -> None:
    client = OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    got = client.embeddings.create(model="minilm", input=TEXTS[0]).data[0].embedding
    np.testing.assert_allclose(got, _embed(server.url)[0], atol=1e-6)
    bad = httpx.post(f"{server.url}/embeddings", json={"input": []})
    assert bad.status_code == 422 and "message" in bad.json()["error"]  # OpenAI's shape


def test_embed_all_gives_every_token_state(server: Server) -> None:
    states = httpx.post(f"{server.url}/embed_all", json={"inputs": TEXTS}).json()
    ids = httpx.post(f"{server.url}/tokenize", json={"inputs": TEXTS}).json()
    for s, toks in zip(states, ids, strict=True):
        assert np.asarray(s).shape == (len(toks), 384)
    # minilm mean-pools its token states: the mean of /embed_all is /embed unnormalized
    pooled = np.asarray(states[0]).mean(axis=0)
    np.testing.assert_allclose(pooled, _embed(server.url, normalize=False)[0], atol=1e-5)
    long = httpx.post(f"{server.url}/embed_all", json={"inputs": "word " * 400})
    assert long.status_code == 413 and "truncate" in long.text
    cut = httpx.post(f"{server.url}/embed_all", json={"inputs": "word " * 400,
                                                      "truncate": True}).json()
    assert np.asarray(cut).shape == (1, 256, 384)


def test_embed_all_follows_the_server_policy_and_its_queue_bound() -> None:
    """/embed_all goes through the model's batcher like every route: the server's
    --truncation applies when the request does not say (it used to be "error" whatever the
    server said), its queue bound answers 429, and a chunking server refuses a long text
    here with a fix that says why (token states of a split text are not one answer)."""
    from tests.server.conftest import serve_here

    long = {"inputs": "word " * 400}
    with serve_here(["minilm"], truncation="truncate", max_queue_inputs=3) as s:
        cut = httpx.post(f"{s.url}/embed_all", json=long, timeout=60)
        assert cut.status_code == 200 and np.asarray(cut.json()).shape == (1, 256, 384)
        many = httpx.post(f"{s.url}/embed_all", json={"inputs": TEXTS + TEXTS}, timeout=60)
        assert many.status_code == 429 and many.json()["error_type"] == "overloaded", many.text
        assert many.headers.get("retry-after")
    with serve_here(["minilm"], truncation="chunk") as s:
        r = httpx.post(f"{s.url}/embed_all", json=long, timeout=60)
        assert r.status_code == 413 and "chunks has no single answer" in r.text, r.text
        ok = httpx.post(f"{s.url}/embed_all", json={"inputs": TEXTS}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()) == len(TEXTS)


def test_decode_round_trips_tokenize(server: Server) -> None:
    toks = httpx.post(f"{server.url}/tokenize", json={"inputs": TEXTS}).json()
    ids = [[t["id"] for t in row] for row in toks]
    from transformers import AutoTokenizer

    from sureserve.zoo.registry import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    assert httpx.post(f"{server.url}/decode", json={"ids": ids}).json() == \
        [tok.decode(row, skip_special_tokens=True) for row in ids]
    one = httpx.post(f"{server.url}/decode", json={"ids": ids[0],
                                                    "skip_special_tokens": False}).json()
    assert one[0].startswith("[CLS]")
    bad = httpx.post(f"{server.url}/decode", json={"ids": [1, 10**9]})
    assert bad.status_code == 422 and "vocabulary" in bad.text


def test_docs_pages_name_no_external_url(server: Server) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{server.url}{page}").text
        external = [u for u in re.findall(r"https?://[^\s\"'<>)]+", html)
                    if not u.startswith("http://127.0.0.1")]
        assert not external, (page, external)
        for asset in re.findall(r"(/docs-assets/[\w.\-]+)", html):
            assert httpx.get(f"{server.url}{asset}").status_code == 200, asset


def test_swagger_ui_renders_the_routes_without_network(server: Server) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: `make setup` installs it (apt-get install "
                    "chromium); it renders /docs in this test")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         # any host but loopback fails to resolve: a page that needs a CDN stays empty
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--virtual-time-budget=15000", "--dump-dom", f"{server.url}/docs"],
        capture_output=True, text=True, timeout=120).stdout
    assert "opblock" in dom, dom[-2000:]  # Swagger UI drew the operations
    for route in ("/embed", "/predict", "/similarity", "/v1/embeddings", "/decode"):
        assert f'data-path="{route}"' in dom or f">{route}<" in dom, route


DOCS = ["The striker scored twice as the home side won the cup final.",
        "The new phone has a faster chip and a better camera.",
        "Shares fell after the bank reported lower profits.",
        "The film won three awards at the festival."]


def test_rerank_tei_shape(server: Server) -> None:
    import sureserve

    url = server.url
    q = "Who won the football cup final?"
    r = httpx.post(f"{url}/rerank", json={"query": q, "texts": DOCS, "return_text": True})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert ranks[0]["index"] == 0 and ranks[0]["text"] == DOCS[0]
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)
    local = sureserve.load("rerank-demo").rerank(q, DOCS)
    assert [x["index"] for x in ranks] == [x["index"] for x in local]
    assert [x["score"] for x in ranks] == pytest.approx([x["score"] for x in local], abs=1e-5)
    raw = httpx.post(f"{url}/rerank", json={"query": q, "texts": DOCS,
                                            "raw_scores": True}).json()
    assert "text" not in raw[0]
    assert 1 / (1 + np.exp(-raw[0]["score"])) == pytest.approx(ranks[0]["score"], abs=1e-5)
    long = "word " * 600
    too = httpx.post(f"{url}/rerank", json={"query": q, "texts": ["x", long]})
    assert too.status_code == 413 and "text 1" in too.json()["error"]
    cut = httpx.post(f"{url}/rerank", json={"query": q, "texts": ["x", long],
                                            "truncate": True}).json()
    assert {x["index"]: x["truncated"] for x in cut} == {0: False, 1: True}
    assert httpx.post(f"{url}/rerank", json={"query": " ", "texts": DOCS}).status_code == 422
    wrong = httpx.post(f"{url}/rerank", json={"query": q, "texts": DOCS, "model": "minilm"})
    assert wrong.status_code == 400 and "rerank" in wrong.text
    # the batch form: several queries' candidates in one request, one ranking per query
    q2 = "Why did bank shares fall?"
    both = httpx.post(f"{url}/rerank", json={"queries": [{"query": q, "texts": DOCS},
                                                         {"query": q2, "texts": DOCS[:3]}],
                                             "return_text": True})
    assert both.status_code == 200, both.text
    first, second = both.json()
    assert [(x["index"], x["text"]) for x in first] == [(x["index"], x["text"]) for x in ranks]
    assert [x["score"] for x in first] == pytest.approx([x["score"] for x in ranks], abs=1e-5)
    single = httpx.post(f"{url}/rerank", json={"query": q2, "texts": DOCS[:3]}).json()
    assert [x["index"] for x in second] == [x["index"] for x in single]
    for body in ({"queries": [{"query": q, "texts": DOCS}], "query": q},  # both shapes
                 {"queries": []}, {"query": q}, {},
                 {"queries": [{"query": q, "texts": DOCS}, {"query": " ", "texts": ["x"]}]}):
        bad = httpx.post(f"{url}/rerank", json=body)
        assert bad.status_code == 422, (body, bad.text)


def test_v1_rerank_shape(server: Server) -> None:
    url = server.url
    q = "Why did bank shares fall?"
    docs = [DOCS[0], {"text": DOCS[2]}, DOCS[1]]
    r = httpx.post(f"{url}/v1/rerank", json={"model": "rerank-demo", "query": q,
                                              "documents": docs, "top_n": 2,
                                              "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "rerank-demo" and body["usage"]["total_tokens"] > 0
    assert len(body["results"]) == 2
    top = body["results"][0]
    assert top["index"] == 1 and top["document"] == {"text": DOCS[2]}
    assert 0 < top["relevance_score"] < 1
    plain = httpx.post(f"{url}/v1/rerank", json={"query": q, "documents": DOCS}).json()
    assert len(plain["results"]) == 4 and "document" not in plain["results"][0]
    bad = httpx.post(f"{url}/v1/rerank", json={"query": q, "documents": DOCS, "top_n": 0})
    assert bad.status_code == 422 and "message" in bad.json()["error"]


def test_v1_rerank_takes_rag_sized_passages_as_told(server: Server) -> None:
    """A whole passage: refused by default naming both ways out; cut by Cohere's
    max_tokens_per_doc; scored as its best chunk on a server told so; every cut listed."""
    import sureserve

    url, q = server.url, "Why did bank shares fall?"
    long = " ".join(["shares fell"] * 150)  # 300 tokens: over rerank-demo's 128 per pair
    docs = [DOCS[2], long]
    too = httpx.post(f"{url}/v1/rerank", json={"query": q, "documents": docs})
    assert too.status_code == 413, too.text
    said = json.dumps(too.json())
    assert "document 1" in said and "max_tokens_per_doc" in said
    assert "SURESERVE_V1_RERANK_TRUNCATION" in said
    capped = httpx.post(f"{url}/v1/rerank", json={"query": q, "documents": docs,
                                                   "max_tokens_per_doc": 40}).json()
    assert [w.split(" was")[0] for w in capped["meta"]["warnings"]] == ["document 1"]
    local = sureserve.load("rerank-demo", drift_watch=False)
    first_40 = " ".join(["shares fell"] * 20)
    want = local.rerank(q, [*docs[:1], first_40])
    got = {r["index"]: r["relevance_score"] for r in capped["results"]}
    assert got == pytest.approx({r["index"]: r["score"] for r in want}, abs=1e-5)
    short = httpx.post(f"{url}/v1/rerank", json={"query": q, "documents": DOCS,
                                                  "max_tokens_per_doc": 100}).json()
    assert short["meta"]["warnings"] == []
    from tests.server.conftest import serve_here

    with serve_here(["rerank-demo"], v1_rerank_truncation="chunk") as chunked:
        r = httpx.post(f"{chunked.url}/v1/rerank", json={"query": q, "documents": docs})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["meta"]["warnings"]) == 1 and "chunks" in body["meta"]["warnings"][0]
        best = local.rerank(q, docs, truncation="chunk")
        assert {x["index"]: x["relevance_score"] for x in body["results"]} == \
            pytest.approx({x["index"]: x["score"] for x in best}, abs=1e-5)
        # the TEI route keeps the server's own policy (error): the setting is per route
        assert httpx.post(f"{chunked.url}/rerank", json={"query": q, "texts": docs}
                          ).status_code == 413


def test_post_root_reranks_when_the_reranker_is_named(server: Server) -> None:
    q = "Who won the football cup final?"
    direct = httpx.post(f"{server.url}/rerank", json={"query": q, "texts": DOCS}).json()
    root = httpx.post(f"{server.url}/", json={"model": "rerank-demo", "query": q,
                                              "texts": DOCS})
    assert root.status_code == 200 and root.json() == direct
