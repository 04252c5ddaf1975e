"""The OpenAI generation routes on a real server (smollm2 on loopback), with the official
``openai`` client and with raw HTTP: streaming, stop strings, refusals, backpressure,
cancellation on disconnect, metrics and graceful shutdown mid-stream."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from sureserve.loading.packed import why_unavailable
from tests.server.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.e2e

# 90 MiB of smollm2's 45 KiB/token cache = a 2048-token budget; a short queue for 429s
ENV = {"SURESERVE_KV_CACHE_MB": "90", "SURESERVE_MAX_QUEUE_INPUTS": "4",
       "SURESERVE_MAX_RUNNING_SEQS": "4"}


@pytest.fixture(scope="module")
def gen_server() -> Iterator[Server]:
    s = start_server(["smollm2"], ENV)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(gen_server: Server) -> OpenAI:
    return OpenAI(base_url=f"{gen_server.url}/v1", api_key="unused", max_retries=0)


def _sse_lines(resp: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def test_openai_client_completion(client: OpenAI) -> None:
    r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens


def test_openai_penalties_and_logit_bias_reach_the_sampler(client: OpenAI) -> None:
    """OpenAI's frequency/presence penalties and logit_bias (their definitions are checked
    on logits in tests/test_sampling.py): a greedy repetition breaks under a penalty, a
    banned token never comes, a forced one always does (ids from smollm2's tokenizer)."""
    def text(prompt: str, **kw: object) -> str:
        r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8,
                                      temperature=0, **kw)  # type: ignore[call-overload]
        return str(r.choices[0].text)

    plain = text("one, one, one, one, one,")
    assert plain.count("one") == 4
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert text("one, one, one, one, one,", **kw).count("one") < 4, kw
    assert "Paris" in text("The capital of France is")
    assert "Paris" not in text("The capital of France is", logit_bias={"7042": -100})  # " Paris"
    forced = client.completions.create(model="smollm2", prompt="Hi", max_tokens=4,
                                       temperature=0.8, seed=3, logit_bias={"4626": 100})
    assert forced.choices[0].text == " river" * 4


def test_logprobs_in_openais_shapes_streamed_and_not(client: OpenAI) -> None:
    """Chat ``logprobs`` + ``top_logprobs`` and completions ``logprobs`` through the openai
    client: one entry per generated token, the streamed ones equal to the whole answer's,
    the greedy token the most likely one (values are checked against a plain forward in
    tests/e2e/test_generate.py)."""
    import math

    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model="smollm2", messages=messages,  # type: ignore
                                           max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3)
    entries = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries is not None and len(entries) == whole.usage.completion_tokens  # type: ignore
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.logprob <= 0 and math.isclose(e.top_logprobs[0].logprob, e.logprob)
        assert bytes(e.bytes or []).decode("utf-8") == e.token
    streamed = [c.choices[0].logprobs.content for c in client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=6, temperature=0,  # type: ignore
        logprobs=True, top_logprobs=3, stream=True) if c.choices and c.choices[0].logprobs]
    flat = [e for part in streamed for e in (part or [])]
    # the same tokens; the values within float noise (the second request reuses the first
    # one's stored prompt prefix, so its prefill computes fewer positions)
    assert [e.token for e in flat] == [e.token for e in entries]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
               for a, b in zip(flat, entries, strict=True))
    plain = client.chat.completions.create(model="smollm2", messages=messages,  # type: ignore
                                           max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == whole.choices[0].message.content
    legacy = client.completions.create(model="smollm2", prompt="The capital of France is",
                                       max_tokens=5, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert "".join(lp.tokens).startswith(legacy.choices[0].text)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(len(d) <= 2 for d in lp.top_logprobs or [])


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(client: OpenAI,
                                                            gen_server: Server) -> None:
    """``echo`` + ``logprobs`` (+ ``max_tokens: 0``), what lm-evaluation-harness's
    ``local-completions`` sends to score a continuation: the prompt's tokens with their
    log-probabilities, the first null; with generation, the prompt's entries come first
    and the generated ones equal the answer's without echo."""
    import math

    prompt = "The capital of France is"
    scored = client.completions.create(model="smollm2", prompt=prompt, max_tokens=0,
                                       echo=True, logprobs=1, temperature=0)
    c = scored.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and c.logprobs is not None
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.tokens is not None and len(lp.tokens) == scored.usage.prompt_tokens == 5
    assert "".join(lp.tokens) == prompt
    assert lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert all(v is not None and v < 0 for v in lp.token_logprobs[1:])
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    assert all(len(d) == 1 for d in lp.top_logprobs[1:])
    plain = client.completions.create(model="smollm2", prompt=prompt, max_tokens=3,
                                      temperature=0, logprobs=2)
    both = client.completions.create(model="smollm2", prompt=prompt, max_tokens=3,
                                     temperature=0, logprobs=2, echo=True)
    assert both.choices[0].text == prompt + plain.choices[0].text
    bl, pl = both.choices[0].logprobs, plain.choices[0].logprobs
    assert bl is not None and pl is not None and bl.token_logprobs and pl.token_logprobs
    assert bl.tokens == lp.tokens + pl.tokens
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in
               zip(bl.token_logprobs[1:5], lp.token_logprobs[1:], strict=True))
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in
               zip(bl.token_logprobs[5:], pl.token_logprobs, strict=True))
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=3, temperature=0, echo=True, stream=True)
        if ch.choices)
    assert streamed == both.choices[0].text
    url = f"{gen_server.url}/v1"
    r = httpx.post(f"{url}/completions", json={"prompt": "Hi", "max_tokens": 0}, timeout=30)
    assert r.status_code == 422 and "max_tokens=0" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "echo": True}, timeout=30)
    assert r.status_code == 422 and "echo" in r.json()["error"]["message"]


def test_token_id_prompts_as_lm_evaluation_harness_sends_them(client: OpenAI,
                                                              gen_server: Server) -> None:
    """OpenAI's completions take prompts as token ids too; lm-evaluation-harness's
    ``local-completions`` sends them so (a batch of id lists, ``max_tokens: 1``, ``echo``,
    ``logprobs: 1``) and reads ``token_logprobs[ctxlen:-1]``: the same figures as the
    text prompt's, one entry per id plus the generated token. Ids outside the vocabulary
    are a 422 naming its size."""
    from transformers import AutoTokenizer

    from sureserve.settings import Settings
    from sureserve.zoo import ZOO

    tok = AutoTokenizer.from_pretrained(ZOO["smollm2"].path(Settings()))
    texts = ["The capital of France is Paris", "Water boils at 100 degrees"]
    ids = [list(tok(t)["input_ids"]) for t in texts]
    by_ids = client.completions.create(model="smollm2", prompt=ids, max_tokens=1, echo=True,
                                       logprobs=1, temperature=0, seed=1234)
    assert [c.index for c in by_ids.choices] == [0, 1]
    for text, row, c in zip(texts, ids, by_ids.choices, strict=True):
        by_text = client.completions.create(model="smollm2", prompt=text, max_tokens=1,
                                            echo=True, logprobs=1, temperature=0)
        a, b = c.logprobs, by_text.choices[0].logprobs
        assert a is not None and b is not None and a.token_logprobs and b.token_logprobs
        assert len(a.token_logprobs) == len(row) + 1 and a.token_logprobs[0] is None
        assert a.tokens == b.tokens and c.text == by_text.choices[0].text
        assert a.token_logprobs[1:] == pytest.approx(b.token_logprobs[1:], abs=1e-5)
    one = client.completions.create(model="smollm2", prompt=ids[0], max_tokens=2,
                                    temperature=0)
    same = client.completions.create(model="smollm2", prompt=texts[0], max_tokens=2,
                                     temperature=0)
    assert len(one.choices) == 1 and one.choices[0].text == same.choices[0].text
    url = f"{gen_server.url}/v1/completions"
    r = httpx.post(url, json={"prompt": [1, 10**7], "max_tokens": 1}, timeout=30)
    assert r.status_code == 422 and "vocabulary has 49152 tokens" in r.text, r.text
    r = httpx.post(url, json={"prompt": [[1, 2], []], "max_tokens": 1}, timeout=30)
    assert r.status_code == 422 and "empty" in r.text, r.text
    r = httpx.post(url, json={"prompt": [1, "a"], "max_tokens": 1}, timeout=30)
    assert r.status_code == 422, r.text


def test_openai_client_chat_stream_equals_non_stream(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    whole = client.chat.completions.create(model="smollm2", messages=messages,  # type: ignore
                                           max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    assert text and "4" in text
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=12, temperature=0,  # type: ignore
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore


def test_raw_sse_ends_with_done_and_several_prompts_are_indexed(gen_server: Server) -> None:
    body = {"prompt": ["1, 2, 3,", "The chemical symbol for gold is"], "max_tokens": 6,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gen_server.url}/v1/completions", json=body,
                      timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = _sse_lines(resp)
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    texts = {0: "", 1: ""}
    for c in chunks:
        assert c["object"] == "text_completion"
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
    plain = httpx.post(f"{gen_server.url}/v1/completions",
                       json={**body, "stream": False}, timeout=60).json()
    assert [ch["text"] for ch in plain["choices"]] == [texts[0], texts[1]]


def test_stop_string_spanning_tokens_over_http(gen_server: Server) -> None:
    url = f"{gen_server.url}/v1/completions"
    base = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    full = httpx.post(url, json=base, timeout=60).json()["choices"][0]["text"]
    stop = full[3:9]  # six characters: more than one token of this text
    assert full.count(stop) == 1
    got = httpx.post(url, json={**base, "stop": [stop]}, timeout=60).json()["choices"][0]
    assert got["text"] == full[:3] and got["finish_reason"] == "stop"


def test_sampling_with_seed_and_n(gen_server: Server) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.9, "seed": 5,
            "n": 2}
    a = httpx.post(f"{gen_server.url}/v1/completions", json=body, timeout=60).json()
    b = httpx.post(f"{gen_server.url}/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]


@pytest.mark.parametrize(("body", "status", "needle", "kind"), [
    ({"prompt": "Hi", "max_tokens": 9000}, 413, "8192", "input_too_long"),
    ({"prompt": "Hi", "max_tokens": 3000}, 413, "budget of 2048", "input_too_long"),
    ({"prompt": ["Hi"] * 17, "n": 16}, 413, "SURESERVE_MAX_CLIENT_BATCH", "too_many_inputs"),
    ({"prompt": "Hi", "temperature": 3}, 422, "temperature", "invalid_input"),
    ({"prompt": "Hi", "top_p": 0}, 422, "top_p", "invalid_input"),
    ({"prompt": "Hi", "frequency_penalty": 3}, 422, "frequency_penalty", "invalid_input"),
    ({"prompt": "Hi", "logit_bias": {"x": 1}}, 422, "logit_bias", "invalid_input"),
    ({"prompt": "Hi", "logit_bias": {"9999999": 1}}, 422, "vocabulary", "invalid_input"),
    ({"prompt": "Hi", "logprobs": 6}, 422, "logprobs", "invalid_input"),
    ({"prompt": "Hi", "n": 0}, 422, "n=0", "invalid_input"),
    ({"prompt": ""}, 422, "empty", "invalid_input"),
    ({"prompt": []}, 422, "empty", "invalid_input"),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop", "invalid_input"),
    ({"prompt": "Hi", "model": "nope"}, 404, "nope", "model_not_found"),
])
def test_refusals_name_the_limit(gen_server: Server, body: dict[str, object], status: int,
                                 needle: str, kind: str) -> None:
    r = httpx.post(f"{gen_server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == kind == err["code"]


def test_chat_refusals(gen_server: Server) -> None:
    url = f"{gen_server.url}/v1/chat/completions"
    assert httpx.post(url, json={"messages": []}, timeout=30).status_code == 422
    r = httpx.post(url, json={"messages": [{"role": "wizard", "content": "x"}]}, timeout=30)
    assert r.status_code == 422
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, timeout=30)
    assert r.status_code == 422 and "tools" in r.json()["error"]["message"]
    # a well-formed tool, but smollm2's chat template has no tools: the model would never
    # see them, so the request is refused rather than answered as if they were there
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        timeout=30)
    assert r.status_code == 422 and "does not render tools" in r.json()["error"]["message"]
    for extra in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        r = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}], **extra},
                       timeout=30)
        assert r.status_code == 422 and "top_logprobs" in r.json()["error"]["message"]


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


def test_structured_output_parses_streamed_and_not(client: OpenAI, gen_server: Server) -> None:
    """What LangChain's with_structured_output sends: a JSON schema in response_format.
    Unconstrained, smollm2 wraps its JSON in a markdown fence; constrained, the content is
    the object itself, streamed or not, and a chat and a completion agree."""
    messages = [{"role": "user", "content": "Give me a person as JSON with a name and an age."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    r = client.chat.completions.create(model="smollm2", messages=messages,  # type: ignore
                                       response_format=fmt, temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    person = json.loads(choice.message.content or "")
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    chunks = client.chat.completions.create(model="smollm2", messages=messages,  # type: ignore
                                            response_format=fmt, temperature=0,
                                            max_tokens=60, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    free = client.chat.completions.create(model="smollm2", messages=messages,  # type: ignore
                                          temperature=0, max_tokens=60)
    assert free.choices[0].message.content != choice.message.content
    obj = httpx.post(f"{gen_server.url}/v1/completions", timeout=60, json={
        "prompt": "A JSON object:", "max_tokens": 40, "temperature": 0,
        "response_format": {"type": "json_object"}}).json()["choices"][0]
    if obj["finish_reason"] == "stop":
        assert isinstance(json.loads(obj["text"]), dict)
    else:  # cut by max_tokens: the client can tell, and the text is a valid prefix
        assert obj["finish_reason"] == "length" and obj["text"].startswith("{")


def test_the_openai_parse_helper_gets_a_pydantic_object(client: OpenAI) -> None:
    """openai's ``chat.completions.parse`` with a pydantic model: what LangChain and the
    SDK's own structured-output helpers send (a strict json_schema)."""
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    r = client.chat.completions.parse(
        model="smollm2", response_format=Person, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Give me a person as JSON with a name and an "
                   "age."}])
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and person.name


def test_structured_output_refusals_say_what_to_fix(gen_server: Server) -> None:
    url = f"{gen_server.url}/v1/chat/completions"
    base = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8}
    cases = [({"type": "xml"}, "'xml' is not supported"),
             ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
                 "type": "object", "if": {"required": ["a"]}}}}, "Unimplemented keys"),
             ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
                 "$ref": "#/definitions/nope"}}}, "cannot be enforced")]
    for fmt, words in cases:
        r = httpx.post(url, json={**base, "response_format": fmt}, timeout=30)
        assert r.status_code == 422, r.text
        assert words in r.json()["error"]["message"], r.text
    huge = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "enum": ["v" * 100 + str(i) for i in range(1000)]}}}
    r = httpx.post(url, json={**base, "response_format": huge}, timeout=30)
    assert r.status_code == 413 and "SURESERVE_MAX_SCHEMA_BYTES" in r.text, r.text
    # a refused request leaves nothing behind: the next one is answered
    r = httpx.post(url, json=base, timeout=60)
    assert r.status_code == 200


def _metric(url: str, name: str) -> float:
    """A gauge of smollm2's (or of the process, when it has no model label)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf'^{name}(?:{{model="smollm2"}})? (\S+)$', text, re.M)
    assert m, name
    return float(m.group(1))


def test_disconnect_mid_stream_cancels_the_sequence(gen_server: Server) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gen_server.url}/v1/completions", json=body,
                      timeout=60) as resp:
        got = 0
        for line in resp.iter_lines():
            got += line.startswith("data: ")
            if got == 3:
                break
    # 400 tokens would take tens of seconds; the cancelled sequence leaves at once
    deadline = time.monotonic() + 10
    while _metric(gen_server.url, "sureserve_running_sequences") > 0:
        assert time.monotonic() < deadline, "the sequence kept running after the disconnect"
        time.sleep(0.2)
    assert _metric(gen_server.url, "sureserve_kv_cache_bytes") == 0


def _idle(url: str) -> None:
    deadline = time.monotonic() + 60
    while (_metric(url, "sureserve_running_sequences")
           or _metric(url, "sureserve_waiting_sequences")):
        assert time.monotonic() < deadline, "sequences still running a minute later"
        time.sleep(0.2)


def test_the_server_returns_to_idle_after_every_kind_of_request(gen_server: Server) -> None:
    """Streaming and plain completions, streams abandoned mid-way, clients that leave
    before any answer, refusals for capacity and size: afterwards the KV cache is empty and
    the event loop holds as many tasks as before (no request leaves anything behind)."""
    url = gen_server.url
    _idle(url)
    time.sleep(0.5)
    tasks = _metric(url, "sureserve_asyncio_tasks")
    host, port = url.removeprefix("http://").split(":")
    body = {"prompt": "Once upon a time", "max_tokens": 300, "temperature": 0}
    for _ in range(2):
        assert httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 4},
                          timeout=60).status_code == 200
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                          timeout=60) as resp:  # abandoned after the first chunk
            next(resp.iter_lines())
        for stream in (False, True):  # gone before any answer
            raw = json.dumps({**body, "stream": stream}).encode()
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(raw), raw))
                time.sleep(0.3)
    assert httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 9000},
                      timeout=60).status_code == 413
    with cf.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda i: httpx.post(
            f"{url}/v1/completions", json={**body, "max_tokens": 8, "stream": i % 2 == 0},
            timeout=120).status_code, range(12)))
    assert 429 in codes and 200 in codes
    _idle(url)
    assert _metric(url, "sureserve_kv_cache_bytes") == 0
    deadline = time.monotonic() + 10
    while _metric(url, "sureserve_asyncio_tasks") > tasks:
        assert time.monotonic() < deadline, "tasks left behind by finished requests"
        time.sleep(0.2)


def test_flood_gets_429_while_accepted_requests_finish(gen_server: Server) -> None:
    url = f"{gen_server.url}/v1/completions"

    def one(i: int) -> httpx.Response:
        return httpx.post(url, json={"prompt": f"Count to {i}:", "max_tokens": 24,
                                     "temperature": 0}, timeout=120)

    with cf.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(one, range(24)))
    codes = [r.status_code for r in responses]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "SURESERVE_MAX_QUEUE_INPUTS" in r.json()["error"]["message"]
        else:
            assert r.json()["choices"][0]["text"]


def test_generation_metrics_are_exported(gen_server: Server) -> None:
    text = httpx.get(f"{gen_server.url}/metrics", timeout=10).text
    for name in ("sureserve_time_to_first_token_seconds_count",
                 "sureserve_generation_queue_seconds_count",
                 "sureserve_inter_token_latency_seconds_count", "sureserve_running_sequences",
                 "sureserve_waiting_sequences", "sureserve_kv_cache_reserved_tokens",
                 "sureserve_kv_cache_budget_tokens", "sureserve_generated_tokens_total"):
        assert name in text, name
    assert _metric(gen_server.url, "sureserve_kv_cache_budget_tokens") == 2048
    # every first token's wait is split: as many queue waits as first tokens, none longer
    firsts = _metric(gen_server.url, "sureserve_time_to_first_token_seconds_count")
    assert firsts > 0
    assert _metric(gen_server.url, "sureserve_generation_queue_seconds_count") == firsts
    assert _metric(gen_server.url, "sureserve_generation_queue_seconds_sum") <= \
        _metric(gen_server.url, "sureserve_time_to_first_token_seconds_sum")
    schema = httpx.get(f"{gen_server.url}/openapi.json", timeout=10).json()
    assert {"/v1/completions", "/v1/chat/completions"} <= set(schema["paths"])


def test_prefix_reuse_shows_in_metrics_and_the_bench_client_reads_streams(
        gen_server: Server) -> None:
    """Two chats with one long system prompt: the second reuses its keys and values
    (/metrics), and the peer bench's streaming client reads tokens, usage and TTFT."""
    import asyncio

    from transformers import AutoTokenizer

    from sureserve.bench.chat import _closed_loop
    from sureserve.loading.source import resolve

    url = gen_server.url
    system = {"role": "system", "content": "Answer briefly. " + "The river runs north. " * 20}
    chats = [[system, {"role": "user", "content": q}] for q in ("Which way?", "Why north?")]
    hits = _metric(url, "sureserve_prefix_cache_hits_total")
    reused = _metric(url, "sureserve_prefix_cache_reused_tokens_total")
    tok = AutoTokenizer.from_pretrained(resolve("smollm2").path)
    results, seconds = asyncio.run(_closed_loop(url, chats, 1, 6, tok))
    assert seconds > 0 and all(r.error is None for r in results), results
    assert all(1 <= r.tokens <= 6 and r.text and r.ttft is not None for r in results)
    assert _metric(url, "sureserve_prefix_cache_hits_total") >= hits + 1
    assert _metric(url, "sureserve_prefix_cache_reused_tokens_total") >= reused + 16 * 5
    assert _metric(url, "sureserve_prefix_cache_bytes") > 0


def test_info_says_how_decoding_runs(gen_server: Server) -> None:
    (model,) = httpx.get(f"{gen_server.url}/info", timeout=10).json()["models"]
    # smollm2 is a llama: the direct step runs, its layers in TorchScript; the layout
    # setting is off by default, and /info says so rather than saying nothing. Whether the
    # GEMV kernel serves small steps is this machine's measurement: the test reads it
    kernel, packing = model["decode_kernel"], model["packed_linear"]
    # smollm2 has grouped-query heads (9 over 3) and runs on a CPU: its masked prefills read
    # them in place (generation/attention.py)
    layout = ("masked prefills read grouped key/value heads in place; "
              "decode weight layout unchanged: turned off (decode_weight_layout = false)")
    # oneDNN packed linears: on by default (packed_linear) wherever this torch has them;
    # which shapes are packed is this machine's measurement
    unavailable = why_unavailable()
    if unavailable is not None:
        assert packing["path"] == f"off: {unavailable}", packing
        assert packing["packed_layers"] == 0 and packing["min_rows"] is None, packing
    else:
        assert packing["path"] == "measured", packing
        assert set(packing["shapes"][0]["ms"]) == {"1", "4", "8", "16", "32", "128"}, packing
        assert packing["max_mb"] == 1024
    for shape in packing["shapes"]:
        if shape["packed"]:  # packed because it measured faster from its min_rows up
            assert all(a >= b * 1.05 for r, (a, b) in shape["ms"].items()
                       if int(r) >= shape["min_rows"]), shape
    assert packing["packed_mb"] <= packing["max_mb"]
    script = "TorchScript"
    if packing["min_rows"] is not None:
        script += (f", oneDNN's packed linears at {packing['min_rows']}+ rows as the forward "
                   "runs them")
        tail = f"; oneDNN packed linears: {packing['packed_layers']} layers ("
    else:
        tail = "; linear layers through F.linear ("
    assert set(kernel["step_ms"]) == {"1", "4", "8", "16", "32"} or kernel["reason"], kernel
    if kernel["max_rows"]:
        top = kernel["max_rows"]
        # chosen because whole steps measured faster at every row count up to max_rows
        # (or, where no whole step was timed, the matmuls by STEP_GAIN)
        figures = kernel["whole_step_ms"] or kernel["step_ms"]
        what = "whole steps" if kernel["whole_step_ms"] else "matmuls"
        margin = 1.05 if kernel["whole_step_ms"] else 1.2
        assert all(a >= b * margin for r, (a, b) in figures.items() if int(r) <= top), kernel
        one = figures["1"]
        gain = f"{what} {one[0] / one[1]:.2f}x faster at 1 row"
        if top != 1:
            gain += f", {figures[str(top)][0] / figures[str(top)][1]:.2f}x at {top}"
        if kernel["panel_rows"]:
            lo = min(kernel["panel_rows"].values())
            gain += (f"; float32 weights in panels ({kernel['panel_mb']:.0f} MiB) from {lo} "
                     f"row{'s' if lo > 1 else ''}")
        if kernel["panel_why"]:
            gain += f"; {kernel['panel_why']}"
        prompts = kernel["prompt_ms"]  # prompts read the panels where they won at 32, 128
        took = kernel["prompt_shapes"]
        assert set(took) == {name for name, ms in prompts.items()
                             if name in kernel["panel_rows"]
                             and all(c < a for a, c in ms.values())}, kernel
        assert not prompts or set(prompts) == set(kernel["panel_rows"]), kernel
        if prompts and took:
            def ratio(r: str) -> float:
                return sum(prompts[n][r][0] for n in took) / sum(prompts[n][r][1]
                                                                 for n in took)
            gains = ", ".join(f"{ratio(r):.2f}x at {r}" for r in ("32", "128"))
            gain += (f"; prompts' products read the panels too ({len(took)} of "
                     f"{len(prompts)} shapes, {gains} rows)")
        elif prompts:
            gain += "; prompts' products through torch's (the panels measured no faster)"
        head = (f"direct decode step (30 layers; sureserve's GEMV kernel ({kernel['kernel']}) "
                f"for steps of up to {top} rows, {gain}, each step one call of the kernel "
                "(every layer and the attention), sums in another order than torch's (greedy "
                f"outputs checked against transformers); larger steps: {script}, "
                "bit-identical to the forward)")
    else:
        assert kernel["reason"], kernel
        head = (f"direct decode step (30 layers, {script}, bit-identical to the forward); "
                f"decode matmuls: torch's kernels ({kernel['reason']})")
    path = model["decode_path"]
    assert path.startswith(head + tail) and path.endswith("; " + layout), (path, head + tail)


def test_the_bench_alternated_phase_times_real_streams(gen_server: Server,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench generate --peer``'s alternated phase against a real server and the bench's
    real streaming client: the server stands for two contenders (no server start in the
    suite), so each gets every request in turn, greedy texts equal, and its rows and
    ratios come out of real token counts and timings."""
    from transformers import AutoTokenizer

    from sureserve.bench import chat
    from sureserve.loading.source import resolve

    monkeypatch.setattr(chat, "_launch", lambda c, report, log: (c.name, gen_server.url))
    stopped: list[str] = []
    monkeypatch.setattr(chat, "_stop", stopped.append)
    contenders = [chat.Contender("sureserve fp32", []), chat.Contender("llama.cpp F32", [])]
    reqs = [[{"role": "user", "content": q}] for q in ("Name a river.", "Name a town.")]
    report: dict[str, Any] = {"runs": [], "peers": {}}
    tok = AutoTokenizer.from_pretrained(resolve("smollm2").path)
    chat._alternated(contenders, reqs, 1, 6, tok, report, lambda m: None,
                     warm=[{"role": "user", "content": "Hello."}])
    assert sorted(stopped) == ["llama.cpp F32", "sureserve fp32"]
    rows = {r["contender"]: r for r in report["runs"]}
    for row in rows.values():
        assert row["workload"] == chat.ALTERNATED and row["clients"] == 1
        assert row["requests"] == 2 and row["errors"] == 0, row
        assert 2 <= row["output_tokens"] <= 12 and row["tokens_per_s"] > 0
        assert row["ttft_p50_s"] is not None and row["peak_rss_mb"] is None
    assert rows["llama.cpp F32"]["identical"] == rows["llama.cpp F32"]["compared"] == 2
    ratio = chat.ratios(report["runs"])["tok/s sureserve fp32 / llama.cpp F32, 1 clients, "
                                        "alternated"]
    assert ratio == round(rows["sureserve fp32"]["tokens_per_s"]
                          / rows["llama.cpp F32"]["tokens_per_s"], 2)


def test_the_bench_reads_the_servers_split_of_the_first_token_wait(
        gen_server: Server) -> None:
    """``bench generate``'s rows for sureserve carry the server's own means over the phase:
    the wait before each prompt's first forward, and the whole time to first token."""
    import asyncio

    from transformers import AutoTokenizer

    from sureserve.bench import chat
    from sureserve.loading.source import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2").path)
    before = chat._first_token_split(gen_server.url)
    assert before is not None
    reqs = [[{"role": "user", "content": q}] for q in ("Name a river.", "Name a town.",
                                                       "Name a sea.")]
    res, _ = asyncio.run(chat._closed_loop(gen_server.url, reqs, 3, 4, tok, "smollm2"))
    assert all(r.error is None for r in res)
    queue, ttft = chat._phase_means(before, chat._first_token_split(gen_server.url))
    assert queue is not None and ttft is not None and 0.0 <= queue <= ttft
    assert chat._phase_means(before, None) == (None, None)  # /metrics unreadable


def test_sigterm_finishes_the_stream_in_flight(gen_server: Server) -> None:
    """The module's last test: it stops the module's server (one smollm2 start less)."""
    s = gen_server
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as resp:
            lines = []
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 2:
                        s.proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]"
        finals = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
        assert finals[-1] in ("stop", "length")
        assert s.proc.wait(timeout=60) == 0
    finally:
        stop_server(s)
