"""Structured output (generation/grammar.py): a random tiny model, which left alone writes
token soup, writes JSON that parses and validates against the schema on every seed when
its rows carry a grammar, next to unconstrained rows in the same batch; bad requests and
schemas llguidance cannot enforce are refused with what to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import sureserve
from sureserve.errors import InputError
from sureserve.generation.grammar import allowed, grammar_for
from sureserve.generation.sampling import SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"enum": ["yes", "no"]}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def tiny(tiny_llama: Path) -> Any:
    return sureserve.load(str(tiny_llama), accept_gate_failure=True,
                          drift_watch=False).generation


def _valid(obj: Any) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "n", "ok"}
            and isinstance(obj["name"], str) and len(obj["name"]) <= 12
            and isinstance(obj["n"], int) and 0 <= obj["n"] <= 99 and obj["ok"] in ("yes", "no"))


def test_constrained_rows_parse_and_validate_next_to_free_rows(tiny: Any) -> None:
    ids = tiny.encode("Describe the item:")
    free = tiny.run([ids], SamplingParams(max_new_tokens=24))[0]
    grammar = grammar_for(FORMAT)
    params = [SamplingParams(max_new_tokens=60, grammar=grammar, temperature=1.0, seed=s)
              for s in range(6)]
    params.append(SamplingParams(max_new_tokens=60, grammar=grammar))  # greedy
    params.append(SamplingParams(max_new_tokens=24))  # unconstrained, same batch
    out = tiny.run([ids] * len(params), params)
    for c in out[:-1]:
        if c.finish_reason == "length":  # cut by max_tokens: the client can tell
            continue
        assert c.finish_reason == "stop"
        assert _valid(json.loads(c.text)), c.text
    assert sum(c.finish_reason == "stop" for c in out[:-1]) >= 5
    assert out[-1].token_ids == free.token_ids  # a free row is untouched by its neighbours
    try:
        json.loads(free.text)
        free_is_json = True
    except ValueError:
        free_is_json = False
    assert not free_is_json  # the random model alone does not write JSON


def test_json_object_mode_gives_an_object(tiny: Any) -> None:
    grammar = grammar_for({"type": "json_object"})
    out = tiny.run([tiny.encode("x")] * 3,
                   [SamplingParams(max_new_tokens=80, grammar=grammar, temperature=0.7, seed=s)
                    for s in range(3)])
    done = [c for c in out if c.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(c.text), dict) for c in done)


def test_the_mask_allows_only_what_can_start_the_output(tiny: Any) -> None:
    (m,) = tiny.grammars.matchers(grammar_for({"type": "json_object"}), 1)
    ok = allowed(m, tiny.vocab_size).nonzero().flatten().tolist()
    assert ok and all(tiny.tok.decode([t]).lstrip().startswith("{") for t in ok)
    assert len(ok) < tiny.vocab_size // 100


@pytest.mark.parametrize("body, words", [
    ({"type": "xml"}, "type 'xml' is not supported"),
    ("json", "must be an object"),
    ({"type": "json_schema"}, "needs an object 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"schema": []}}, "needs an object"),
])
def test_malformed_response_formats_are_refused(body: Any, words: str) -> None:
    with pytest.raises(InputError, match=words):
        grammar_for(body)


def test_text_and_none_are_unconstrained() -> None:
    assert grammar_for(None) is None and grammar_for({"type": "text"}) is None


def test_a_schema_keyword_it_cannot_enforce_is_named(tiny: Any) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}},
              "if": {"required": ["a"]}, "then": {"required": ["b"]}}
    grammar = grammar_for({"type": "json_schema", "json_schema": {"schema": schema}})
    with pytest.raises(InputError, match=r"Unimplemented keys: \[.*if") as err:
        tiny.submit([tiny.encode("x")], SamplingParams(max_new_tokens=8, grammar=grammar))
    assert "json_schema" in err.value.fix
    assert tiny.waiting == 0  # nothing was queued


def test_the_python_api_and_a_schema_over_the_limit(tool_llama: Path) -> None:
    """``generate(response_format=...)`` and ``complete(tools=...)`` take the same path as
    the server; a schema over ``max_schema_bytes`` is a 413 naming the setting."""
    from sureserve.errors import InputTooLongError
    from tests.test_tools import ASK, SCHEMAS, TOOLS

    engine = sureserve.load(str(tool_llama), accept_gate_failure=True, drift_watch=False,
                            max_schema_bytes=400)
    (text,) = engine.generate(["Describe:"], max_new_tokens=60, response_format=FORMAT)
    assert _valid(json.loads(text))
    (c,) = engine.complete([ASK], tools=TOOLS, tool_choice="required", max_new_tokens=60)
    assert c.finish_reason == "tool_calls" and c.tool_calls
    assert all(call["function"]["name"] in SCHEMAS for call in c.tool_calls)
    with pytest.raises(InputError, match="need chat prompts"):
        engine.complete(["plain"], tools=TOOLS)
    big = {"type": "json_schema", "json_schema": {"schema": {
        "enum": [f"value number {i}" for i in range(40)]}}}
    with pytest.raises(InputTooLongError, match="SURESERVE_MAX_SCHEMA_BYTES"):
        engine.generate(["x"], max_new_tokens=4, response_format=big)


def test_the_cli_writes_json_valid_against_a_schema_file(tool_llama: Path,
                                                        tmp_path: Path) -> None:
    from tests.cli import cli

    schema = tmp_path / "item.json"
    schema.write_text(json.dumps(SCHEMA))
    r = cli("generate", "Describe:", "Another:", "-m", str(tool_llama), "--json-schema",
            str(schema), "--json", "--accept-gate-failure", "--max-new-tokens", "60")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    assert all(_valid(json.loads(row["text"])) for row in rows if row["finish_reason"] == "stop")
    bad = cli("generate", "x", "-m", str(tool_llama), "--json-schema", str(tmp_path / "no"))
    assert bad.returncode != 0 and "--json-schema" in bad.stderr


def test_sequences_of_one_request_each_get_their_own_matcher(tiny: Any) -> None:
    """One grammar, three sequences in one submit (as ``n`` sends them): the grammar is
    built once and copied; a shared matcher would be fed three rows' tokens and break."""
    params = SamplingParams(max_new_tokens=60, grammar=grammar_for(FORMAT), temperature=1.0,
                            seed=3)
    ids = tiny.submit([tiny.encode("Describe:")] * 3, params)  # one submit, as ``n`` does
    while tiny.has_work:
        tiny.step()
    out = [tiny.result(i) for i in ids]
    done = [c for c in out if c is not None and c.finish_reason == "stop"]
    assert done and all(_valid(json.loads(c.text)) for c in done)
