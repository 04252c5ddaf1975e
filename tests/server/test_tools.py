"""Tool calls over HTTP, as the official OpenAI client sends and reads them: tool_calls with
ids and JSON-string arguments, finish_reason "tool_calls", streamed deltas that add up to
the same calls, a multi-turn conversation with a tool result; a model whose template has
no tools is refused with what to do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.server.conftest import LocalServer, serve_here
from tests.test_tools import ASK, SCHEMAS, TOOLS, _check

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tool_server(tool_llama: Path) -> Iterator[LocalServer]:
    with serve_here([str(tool_llama)], accept_gate_failure=True, drift_watch=False) as s:
        yield s


@pytest.fixture(scope="module")
def client(tool_server: LocalServer) -> OpenAI:
    return OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def name(client: OpenAI) -> str:
    return client.models.list().data[0].id


def test_required_and_named_calls_in_openais_shapes(client: OpenAI, name: str) -> None:
    r = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS,  # type: ignore
                                       tool_choice="required", temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [c.model_dump() for c in choice.message.tool_calls or []]
    assert calls
    _check(calls)
    named = client.chat.completions.create(
        model=name, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,  # type: ignore
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == set(SCHEMAS["get_weather"]["required"])


def test_streamed_tool_calls_add_up_to_the_same_calls(client: OpenAI, name: str) -> None:
    kw: Any = dict(model=name, messages=ASK, tools=TOOLS, tool_choice="required",
                   temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls or []
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for d in chunk.choices:
            reasons.append(d.finish_reason)
            for tc in d.delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                c["name"] += (tc.function.name or "") if tc.function else ""
                c["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert reasons[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_a_tool_result_turn_is_answered(client: OpenAI, name: str) -> None:
    first = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS,  # type: ignore
                                           tool_choice="required", temperature=0,
                                           max_tokens=80).choices[0].message
    call = (first.tool_calls or [])[0]
    turn: Any = [*ASK, {"role": "assistant", "content": None,
                        "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    r = client.chat.completions.create(model=name, messages=turn, tools=TOOLS, temperature=0,
                                       max_tokens=16, tool_choice="none")
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content is not None


def test_bad_tool_requests_are_refused(tool_server: LocalServer) -> None:
    url = f"{tool_server.url}/v1/chat/completions"
    for body, words in (({"tools": [{"type": "function", "function": {"name": "a b"}}]},
                         "is invalid"),
                        ({"tool_choice": "required"}, "without tools"),
                        ({"tools": TOOLS, "tool_choice": "required",
                          "response_format": {"type": "json_object"}}, "both constrain")):
        r = httpx.post(url, json={"messages": ASK, "max_tokens": 4, **body}, timeout=30)
        assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
