"""Tool calls: OpenAI ``tools`` + ``tool_choice`` on chat completions, produced under
constrained decoding (``grammar.py``), never parsed out of free text and hoped for.

The tools are rendered by the model's own chat template (``apply_chat_template(...,
tools=...)``); a template that does not mention tools cannot show them to the model, so the
request is refused (422) rather than answered by a model that never saw them. Then, by
``tool_choice``:

- ``"none"``: the tools are left out of the prompt, plain generation;
- ``"required"``: the output is a JSON array of one or more calls, each
  ``{"name": <one of the tools>, "arguments": <that tool's parameters schema>}``;
- a named function: the output is that function's arguments object;
- ``"auto"`` (the default when tools are sent): the model chooses between a plain answer
  and calls in its template's own format. Only templates that write calls as
  ``<tool_call>{json}</tool_call>`` (Hermes, Qwen2.5, SmolLM3 and most open chat models) are
  read: the grammar allows text that starts with neither ``<``, ``{`` nor white space (a
  plain answer), one or more such blocks whose JSON is a valid call, or one valid call as
  a bare JSON object (what small models write: Qwen2.5-Coder-0.5B answers a weather
  question with ``{"name": "get_weather", ...}`` and no tags). For other templates ``auto``
  is refused with the two choices that work everywhere (``required`` or a named function).

The result is OpenAI's ``tool_calls`` (ids, ``arguments`` as a JSON string) with
``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from sureserve.errors import InputError
from sureserve.generation.sampling import SamplingParams

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
FIX_TOOLS = ("send tools as [{'type': 'function', 'function': {'name': ..., 'description': "
             "..., 'parameters': {JSON schema of an object}}}]")


@dataclass
class ToolPlan:
    """What a chat request's tools mean for its prompt and its decoding."""

    mode: str  # none | auto | required | named
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's, as sent
    grammar: str | None = None
    named: str | None = None

    @property
    def render(self) -> list[dict[str, Any]] | None:
        """The tools the chat template shows the model (none for ``tool_choice: none``)."""
        return self.tools if self.tools and self.mode != "none" else None

    def constrain(self, params: SamplingParams) -> SamplingParams:
        """``params`` with this plan's grammar (unchanged when it has none); a request that
        also constrains its output with ``response_format`` is refused."""
        if self.grammar is None:
            return params
        if params.grammar is not None:
            raise InputError("response_format and tools both constrain the output",
                             "send one of them (tool_choice 'none' keeps response_format)")
        return dataclasses.replace(params, grammar=self.grammar)

    def finished(self, text: str, reason: str) -> list[dict[str, Any]] | None:
        """The tool calls of a finished output, or None: a plain answer, or an output cut
        by ``max_tokens`` (``length``: returned as text, the client can tell)."""
        return self.calls(text) if reason == "stop" else None

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI ``tool_calls`` from a finished output, or None when it is a plain answer
        (``auto`` only). The grammar guarantees the shapes; anything else is a bug, and
        raises rather than being passed on as a call."""
        if self.mode == "named":
            json.loads(text)  # an arguments object, by construction
            return [_call(self.named or "", text)]
        if self.mode == "required":
            return [_written(c) for c in json.loads(text)]
        if self.mode == "auto" and text.startswith(HERMES_OPEN):
            found = re.findall(re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE),
                               text, re.S)
            return [_written(json.loads(f)) for f in found]
        if self.mode == "auto" and text.startswith("{"):  # one bare JSON call
            return [_written(json.loads(text))]
        return None


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _written(call: dict[str, Any]) -> dict[str, Any]:
    """A call the model wrote as ``{"name", "arguments": {...}}``, in OpenAI's shape."""
    return _call(call["name"], json.dumps(call["arguments"]))


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    """name -> parameters schema, each tool checked (a 422 naming the bad one)."""
    if not isinstance(tools, list) or not tools:
        raise InputError("tools must be a non-empty list", FIX_TOOLS)
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or \
                not isinstance(fn, dict):
            raise InputError(f"tools[{i}] is not a function tool", FIX_TOOLS)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InputError(f"tools[{i}].function.name {name!r} is invalid: 1-64 letters, "
                             "digits, _ or -", FIX_TOOLS)
        if name in out:
            raise InputError(f"tools[{i}]: the function name {name!r} appears twice",
                             "give every tool its own name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InputError(f"tools[{i}].function.parameters must be a JSON schema object",
                             FIX_TOOLS)
        out[name] = params
    return out


def supports_tools(template: str | None) -> bool:
    return bool(template) and "tools" in str(template)


def plan(tools: Any, tool_choice: Any, template: str | None, model: str,
         limit: int = 65_536) -> ToolPlan | None:
    """The request's tool plan (None: no tools, plain chat), or a 422 saying what to send
    (413 when the tools' schemas together pass ``limit`` bytes: ``max_schema_bytes``)."""
    from llguidance import LLMatcher

    from sureserve.generation.grammar import check_size, schema_grammar

    if tools is None:
        if tool_choice not in (None, "none"):
            raise InputError(f"tool_choice {tool_choice!r} was sent without tools",
                             "send tools with it, or leave tool_choice out")
        return None
    functions = _functions(tools)
    check_size(list(functions.values()), limit, "the tools' parameters schemas")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none", list(tools))
    if not supports_tools(template):
        raise InputError(f"{model}'s chat template does not render tools, so the model would "
                         "never see them", "serve a model whose chat template supports tools "
                         "(its tokenizer_config.json chat_template mentions them), or send "
                         "tool_choice 'none'")
    what = "a tool's parameters"
    if choice == "required":
        return ToolPlan("required", list(tools), schema_grammar(
            {"type": "array", "minItems": 1, "items": _any_call(functions)}, what, FIX_TOOLS))
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if choice.get("type") == "function" and isinstance(fn, dict) \
            else None
        if not isinstance(name, str) or name not in functions:
            raise InputError(f"tool_choice names {name!r}, which is not among the tools "
                             f"({', '.join(functions)})", "name one of the tools sent, as "
                             "{'type': 'function', 'function': {'name': ...}}")
        return ToolPlan("named", list(tools), schema_grammar(functions[name], what, FIX_TOOLS),
                        named=name)
    if choice != "auto":
        raise InputError(f"tool_choice {choice!r} is invalid",
                         "send 'auto', 'none', 'required' or {'type': 'function', "
                         "'function': {'name': ...}}")
    if HERMES_OPEN not in str(template):
        raise InputError(f"tool_choice 'auto' needs to read calls in {model}'s own format, "
                         "and its chat template does not write <tool_call> blocks",
                         "send tool_choice 'required' or a named function: both work with "
                         "any template")
    call = json.dumps(_any_call(functions))
    # a plain answer cannot start with '<', '{' or white space: those begin calls
    lark = (f'start: calls | bare | free\n'
            f'calls: call ("\\n" call)*\n'
            f'call: "{HERMES_OPEN}\\n" body "\\n{HERMES_CLOSE}"\n'
            f'body: %json {call}\n'
            f'bare: %json {call}\n'
            f'free: FREE\n'
            f'FREE: /[^<{{\\s][\\s\\S]*/\n')
    return ToolPlan("auto", list(tools), str(LLMatcher.grammar_from_lark(lark)))


def _any_call(functions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"anyOf": [{"type": "object", "additionalProperties": False,
                       "required": ["name", "arguments"],
                       "properties": {"name": {"const": name}, "arguments": params}}
                      for name, params in functions.items()]}


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates read them: an assistant's tool calls with their
    arguments as objects (OpenAI sends JSON strings; templates apply ``tojson``)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [
                {**c, "function": {**c["function"], "arguments": _loads(c["function"])}}
                for c in calls]}
        out.append(m)
    return out


def _loads(fn: dict[str, Any]) -> Any:
    args = fn.get("arguments")
    if not isinstance(args, str):
        return args
    try:
        return json.loads(args)
    except ValueError as exc:
        raise InputError(f"tool call {fn.get('name')!r} has arguments that are not JSON",
                         "send arguments as a JSON-encoded object") from exc
