"""Structured output: constrained decoding with llguidance.

A request that asks for JSON (OpenAI's ``response_format``: ``json_object``, or
``json_schema`` with a schema) gets a grammar, and each of its decode steps may only pick
a token that keeps the output a prefix of something the grammar accepts: the tokens that
would break it get ``-inf`` before the choice (greedy or sampled), inside the continuous
batch (rows with and without grammars share the step). So the output parses and
validates by construction; it can only fall short when ``max_tokens`` cuts it, and then
its finish reason is ``length``.

Why llguidance (PyPI ``llguidance``): a Rust engine with no Python dependencies (the wheel
is ~3 MB; xgrammar pulls in triton and a torch pin, outlines-core compiles a whole-vocabulary
index per schema up front), a JSON-schema compiler that names what it cannot do, and a
token mask computed lazily per step in tens of microseconds (measured in BENCHMARKS.md
"Generation: structured output"). vLLM, SGLang and llama.cpp use it too.

Pieces: ``grammar_for`` turns a ``response_format`` into a grammar (a clear 422 for a
schema llguidance cannot compile, naming the keyword); ``Grammars`` holds the model's
llguidance tokenizer (built once, ~1 s) and starts a request's matchers (its grammar built
once, copied per sequence); the sampler asks each matcher for its mask (``allowed``), and
the engine feeds it every chosen token (``RowState.observe``) and ends the request when the
grammar is complete.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from sureserve.errors import InputError, InputTooLongError

FIX = ("send response_format {'type': 'json_object'} or {'type': 'json_schema', "
       "'json_schema': {'name': ..., 'schema': {...}}} with a schema within JSON Schema's "
       "common keywords")


def check_size(schema: Any, limit: int, what: str) -> None:
    """A schema past ``limit`` bytes of JSON is refused (413) before its grammar is built:
    building one holds the generation worker, and a huge one would hold it for everyone."""
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > limit:
        raise InputTooLongError(f"{what} is {size} bytes of JSON, over the {limit}-byte limit",
                                "send a smaller schema, or raise SURESERVE_MAX_SCHEMA_BYTES "
                                "(--max-schema-bytes)", length=size, limit=limit)


def schema_grammar(schema: Any, what: str, fix: str) -> str:
    """The llguidance grammar of a JSON schema, with JSON whitespace kept compact (a model
    cannot spend its tokens on blank lines). Something that is not a JSON schema object is a
    422 naming ``what``; a schema's unsupported keywords are reported when the matcher is
    built (``Grammars.matchers``). Shared by ``response_format`` and tools."""
    from llguidance import LLMatcher

    try:
        return str(LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}))
    except ValueError as exc:
        raise InputError(f"{what} is not a valid JSON schema: {exc}", fix) from exc


def grammar_for(response_format: Any, limit: int = 65_536) -> str | None:
    """The llguidance grammar for an OpenAI ``response_format`` (None: unconstrained).
    Raises ``InputError`` for a malformed request and ``InputTooLongError`` for a schema
    over ``limit`` bytes (the ``max_schema_bytes`` setting); a schema's unsupported keywords
    are reported when the matcher is built (``Grammars.matchers``)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InputError("response_format must be an object", FIX)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":  # any JSON object (OpenAI's JSON mode)
        return schema_grammar({"type": "object"}, "json_object", FIX)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InputError("response_format json_schema needs an object 'json_schema' "
                             "with an object 'schema'", FIX)
        schema = spec.get("schema", {})
        check_size(schema, limit, "the response_format schema")
        return schema_grammar(schema, "the response_format schema", FIX)
    raise InputError(f"response_format type {kind!r} is not supported",
                     "use 'text', 'json_object' or 'json_schema'")


class Grammars:
    """The model's llguidance tokenizer (built on first use: ~1 s) and its matchers."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        self._hf = hf_tokenizer
        self._vocab = vocab_size
        self._eos = sorted(eos_ids)
        self._tok: Any = None
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                import llguidance.hf

                self._tok = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self._vocab, eos_token=self._eos or None)
            return self._tok

    def matchers(self, grammar: str, n: int) -> list[Any]:
        """Fresh matchers for ``n`` sequences of one request: the grammar is built once and
        copied (building is the costly part). A grammar llguidance cannot build (an
        unsupported schema keyword, a bad regex) is a 422 with its reason."""
        from llguidance import LLMatcher

        m = LLMatcher(self.tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise InputError("the output constraint (response_format or tool parameters) "
                             f"cannot be enforced: {_reason(m.get_error())}", FIX)
        return [m, *(m.deep_copy() for _ in range(n - 1))]


def _reason(error: str) -> str:
    """llguidance's message, first line (it names the keyword: 'Unimplemented keys: ...')."""
    return error.strip().splitlines()[0] if error.strip() else "unknown grammar error"


def allowed(matcher: Any, vocab: int) -> Any:
    """A boolean tensor ``(vocab,)``: the tokens the grammar allows next."""
    import numpy as np
    import torch

    words = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    bits = np.unpackbits(words, bitorder="little")[:vocab]
    return torch.from_numpy(bits.astype(bool))
