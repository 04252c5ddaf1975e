"""Tool calls (generation/tools.py) on a random tiny model with a Hermes-style template:
whatever the seed, ``required`` and named choices give calls to the tools sent with
arguments valid per their schemas, ``auto`` gives either a plain answer or such calls; the
template renders the tools (and ``none`` leaves them out); what cannot work is refused
with what to send instead."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import sureserve
from sureserve.errors import InputError
from sureserve.generation import tools as T
from sureserve.generation.sampling import SamplingParams

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 20},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "maxLength": 10}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "now",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def gen(tool_llama: Path) -> Any:
    return sureserve.load(str(tool_llama), accept_gate_failure=True,
                          drift_watch=False).generation


def _run(gen: Any, plan: T.ToolPlan, seeds: range) -> list[Any]:
    ids = gen.encode(ASK, plan.render)
    return gen.run([ids] * len(seeds), [SamplingParams(max_new_tokens=80, grammar=plan.grammar,
                                                      temperature=1.0, seed=s) for s in seeds])


def _check(calls: list[dict[str, Any]]) -> None:
    for c in calls:
        assert c["id"].startswith("call_") and c["type"] == "function"
        name = c["function"]["name"]
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])


def test_required_gives_valid_calls_on_every_seed(gen: Any) -> None:
    plan = T.plan(TOOLS, "required", gen.tok.chat_template, "tiny")
    assert plan is not None and plan.mode == "required"
    done = [c for c in _run(gen, plan, range(6)) if c.finish_reason == "stop"]
    assert len(done) >= 4
    for c in done:
        calls = plan.calls(c.text)
        assert calls
        _check(calls)


def test_a_named_function_gives_its_arguments(gen: Any) -> None:
    plan = T.plan(TOOLS, {"type": "function", "function": {"name": "get_time"}},
                  gen.tok.chat_template, "tiny")
    assert plan is not None
    done = [c for c in _run(gen, plan, range(4)) if c.finish_reason == "stop"]
    assert done
    for c in done:
        (call,) = plan.calls(c.text) or []
        assert call["function"]["name"] == "get_time"
        _check([call])


def test_auto_gives_a_plain_answer_or_valid_calls(gen: Any) -> None:
    plan = T.plan(TOOLS, None, gen.tok.chat_template, "tiny")
    assert plan is not None and plan.mode == "auto"
    for c in _run(gen, plan, range(8)):
        if c.finish_reason != "stop":
            continue
        calls = plan.calls(c.text)
        if calls is None:
            assert c.text[:1] not in ("<", "{", " ", "\n")
        else:
            _check(calls)
    forced = plan.calls('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
                        '</tool_call>')
    assert forced and forced[0]["function"] == {"name": "get_time",
                                                "arguments": '{"zone": "UTC"}'}
    bare = plan.calls('{"name": "get_time", "arguments": {"zone": "UTC"}}')
    assert bare and bare[0]["function"]["name"] == "get_time"
    # the grammar itself: a bare call, tagged calls and plain text pass; a bad call fails
    (m,) = gen.grammars.matchers(plan.grammar, 1)
    for text, ok in (('{"name": "get_time", "arguments": {"zone": "UTC"}}', True),
                     ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "X"}}\n'
                      '</tool_call>', True), ("Sunny, 18 C.", True),
                     ('{"name": "get_time", "arguments": {"city": "Paris"}}', False),
                     (" leading space", False)):
        m.reset()
        ids = gen.tok(text, add_special_tokens=False)["input_ids"]
        assert (m.validate_tokens(ids) == len(ids)) is ok, text


def test_the_template_renders_the_tools_and_none_leaves_them_out(gen: Any) -> None:
    with_tools = gen.tok.decode(gen.encode(ASK, TOOLS))
    assert "get_weather" in with_tools and "<tools>" in with_tools
    none = T.plan(TOOLS, "none", gen.tok.chat_template, "tiny")
    assert none is not None and none.render is None and none.grammar is None
    assert "get_weather" not in gen.tok.decode(gen.encode(ASK, none.render))
    # a conversation with an earlier call and its result renders (arguments as objects)
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    text = gen.tok.decode(gen.encode(turn, TOOLS))
    assert '"arguments": {"city": "Paris"}' in text and "18 C" in text


@pytest.mark.parametrize("tools, choice, template, words", [
    (TOOLS, "required", "{{ messages }}", "does not render tools"),
    (TOOLS, "auto", "{{ tools }}{{ messages }}", "does not write <tool_call> blocks"),
    ([{"type": "function"}], "required", None, "tools[0] is not a function tool"),
    ([{"type": "function", "function": {"name": "bad name"}}], "auto", None, "is invalid"),
    (TOOLS + TOOLS[:1], "auto", None, "appears twice"),
    (None, "required", None, "without tools"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, None, "not among the tools"),
    (TOOLS, "sometimes", None, "'sometimes' is invalid"),
])
def test_what_cannot_work_is_refused(gen: Any, tools: Any, choice: Any, template: Any,
                                     words: str) -> None:
    with pytest.raises(InputError, match=re.escape(words)):
        T.plan(tools, choice, template or gen.tok.chat_template, "tiny")


def test_arguments_that_are_not_json_are_refused() -> None:
    bad = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(InputError, match="not JSON"):
        T.for_template(bad)
