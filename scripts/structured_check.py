"""Structured output on a real model: validity and cost (BENCHMARKS.md "Generation:
structured output"). smollm2 (or another generation model), chat prompts asking for a
person record:

- validity: every prompt once unconstrained and once with the schema as response_format
  (greedy); how many outputs parse as JSON and validate against the schema (jsonschema);
- cost: the same 8 prompts decoded together, all constrained vs all free, tok/s (best of 3,
  alternated), and the time spent computing and applying the grammar's mask per token.

    .venv/bin/python scripts/structured_check.py [-m MODEL] [-o out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema

import sureserve
from sureserve.generation import continuous as C
from sureserve.generation import grammar as G
from sureserve.generation.sampling import SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "city", "hobbies"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                         "city": {"type": "string"},
                         "hobbies": {"type": "array", "items": {"type": "string"},
                                     "maxItems": 3}}}
SUBJECTS = ["a retired teacher", "a young chef", "a painter from Lisbon", "a football coach",
            "a nurse", "a software engineer", "a farmer", "a student of music", "a pilot",
            "a librarian", "a marathon runner", "a carpenter", "a poet", "a doctor in Oslo",
            "a baker", "a journalist", "a taxi driver", "a physicist", "a gardener",
            "a singer"]


#: the mix: (what the prompt asks for, its schema): nested objects, enums, arrays, numbers
#: with bounds, as the issue's measurement asks
MIX = [
    ("a book with its author (name and birth year) and a rating from 1 to 5",
     {"type": "object", "additionalProperties": False, "required": ["title", "author", "rating"],
      "properties": {"title": {"type": "string", "maxLength": 60},
                     "author": {"type": "object", "additionalProperties": False,
                                "required": ["name", "born"],
                                "properties": {"name": {"type": "string", "maxLength": 40},
                                               "born": {"type": "integer", "minimum": 1000,
                                                        "maximum": 2025}}},
                     "rating": {"type": "integer", "minimum": 1, "maximum": 5}}}),
    ("the sentiment of the sentence 'I loved the ending' and your confidence",
     {"type": "object", "additionalProperties": False, "required": ["label", "confidence"],
      "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                     "confidence": {"type": "number", "minimum": 0, "maximum": 1}}}),
    ("a shopping list of up to five items with quantities",
     {"type": "object", "additionalProperties": False, "required": ["items"],
      "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
          "type": "object", "additionalProperties": False, "required": ["name", "qty"],
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "qty": {"type": "integer", "minimum": 1, "maximum": 99}}}}}}),
    ("a meeting: its day of the week, its start hour and whether it is online",
     {"type": "object", "additionalProperties": False, "required": ["day", "hour", "online"],
      "properties": {"day": {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday"]},
                     "hour": {"type": "integer", "minimum": 8, "maximum": 18},
                     "online": {"type": "boolean"}}}),
    ("a city with its country and population and three landmarks",
     {"type": "object", "additionalProperties": False,
      "required": ["city", "country", "population", "landmarks"],
      "properties": {"city": {"type": "string", "maxLength": 40},
                     "country": {"type": "string", "maxLength": 40},
                     "population": {"type": "integer", "minimum": 0},
                     "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                   "minItems": 3, "maxItems": 3}}}),
]


@contextlib.contextmanager
def _timed(module: Any, name: str, count: Callable[..., int]) -> Iterator[dict[str, float]]:
    """Time every call of ``module.name`` while the block runs (looked up at call time by
    its callers): seconds and ``count(*args)`` summed; the caller may reset both."""
    real = getattr(module, name)
    spent = {"s": 0.0, "n": 0.0}

    def wrapper(*args: Any) -> Any:
        t0 = time.perf_counter()
        out = real(*args)
        spent["s"] += time.perf_counter() - t0
        spent["n"] += count(*args)
        return out

    setattr(module, name, wrapper)
    try:
        yield spent
    finally:
        setattr(module, name, real)


def _rows(logits: Any, rows: Any) -> int:
    return len(rows)


def _valid(text: str, schema: Any = SCHEMA) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def _mix(gen: Any, n: int) -> dict[str, Any]:
    """``n`` requests over the schema mix, greedy, all submitted together (so rows with
    different grammars share steps), each also unconstrained; and tok/s constrained vs
    free at 1 row and at 32 rows."""
    reqs = [MIX[i % len(MIX)] for i in range(n)]
    styles = ["", " Be brief.", " Answer in JSON.", " Use realistic values."]
    prompts = [gen.encode([{"role": "user", "content": f"Describe {ask} as a JSON "
                            f"object.{styles[(i // len(MIX)) % len(styles)]}"}])
               for i, (ask, _) in enumerate(reqs)]
    grammars = [G.grammar_for({"type": "json_schema", "json_schema": {"schema": sch}})
                for _, sch in reqs]
    held = gen.run(prompts, [SamplingParams(max_new_tokens=160, grammar=g) for g in grammars])
    free = gen.run(prompts, SamplingParams(max_new_tokens=160))
    out: dict[str, Any] = {
        "requests": n,
        "constrained_valid": sum(_valid(c.text, s) for c, (_, s) in zip(held, reqs, strict=True)),
        "constrained_finish": {r: sum(c.finish_reason == r for c in held)
                               for r in ("stop", "length")},
        "valid_of_stopped": sum(_valid(c.text, s) for c, (_, s) in zip(held, reqs, strict=True)
                                if c.finish_reason == "stop"),
        "free_valid": sum(_valid(c.text, s) for c, (_, s) in zip(free, reqs, strict=True))}
    print(f"mix of {n}: constrained valid {out['constrained_valid']}/{n} (finish "
          f"{out['constrained_finish']}, valid among stopped {out['valid_of_stopped']}), "
          f"unconstrained valid {out['free_valid']}/{n}", flush=True)
    # throughput at 1 and 32 rows. Raw tok/s mixes two things: the grammar's cost per token
    # and constrained rows ending as soon as their JSON closes (the batch thins out sooner).
    # So the token choice is also timed (mask, logits copy, per-row choice), and the
    # grammar's cost alone is the free rate with the extra choice time per token added.
    with _timed(C, "choose", _rows) as timing:  # the engine's module-level name
        _throughput(gen, prompts, grammars, timing, out)
    return out


def _throughput(gen: Any, prompts: list[Any], grammars: list[Any], timing: dict[str, float],
                out: dict[str, Any]) -> None:
    for rows in (1, 32):
        batch, gs = prompts[:rows], grammars[:rows]
        best = {"free": 0.0, "constrained": 0.0}
        per_token = {"free": 1e9, "constrained": 1e9}
        for _ in range(2):
            for name in ("free", "constrained"):
                params = [SamplingParams(max_new_tokens=48, grammar=g if name == "constrained"
                                         else None) for g in gs]
                timing.update(s=0.0, n=0.0)
                t0 = time.perf_counter()
                done = gen.run(batch, params)
                rate = sum(c.completion_tokens for c in done) / (time.perf_counter() - t0)
                best[name] = max(best[name], rate)
                per_token[name] = min(per_token[name], timing["s"] / max(timing["n"], 1))
        extra = per_token["constrained"] - per_token["free"]
        alone = 1 / (1 / best["free"] + extra)  # tokens/s with the extra cost per token
        row = {"free_tok_s": round(best["free"], 2),
               "constrained_tok_s_raw": round(best["constrained"], 2),
               "raw_ratio": round(best["constrained"] / best["free"], 3),
               "choice_ms_per_token": {k: round(v * 1e3, 3) for k, v in per_token.items()},
               "grammar_cost_ratio": round(alone / best["free"], 3)}
        out[f"{rows}_rows"] = row
        print(f"{rows} rows: free {row['free_tok_s']} tok/s, constrained (raw) "
              f"{row['constrained_tok_s_raw']} tok/s ({row['raw_ratio']}x); token choice "
              f"{row['choice_ms_per_token']} ms per token: the grammar alone costs "
              f"{row['grammar_cost_ratio']}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--mix", type=int, default=100, help="requests of the schema mix")
    args = ap.parse_args()
    gen = sureserve.load(args.model).generation
    grammar = G.grammar_for({"type": "json_schema",
                             "json_schema": {"name": "person", "schema": SCHEMA}})
    prompts = [gen.encode([{"role": "user", "content": f"Describe {s} as a JSON object with "
                            "name, age, city and hobbies."}]) for s in SUBJECTS]
    t = time.perf_counter()
    gen.grammars.tokenizer()
    tokenizer_s = time.perf_counter() - t

    free = gen.run(prompts, SamplingParams(max_new_tokens=120))
    held = gen.run(prompts, SamplingParams(max_new_tokens=120, grammar=grammar))
    validity = {
        "prompts": len(prompts),
        "free_valid": sum(_valid(c.text) for c in free),
        "constrained_valid": sum(_valid(c.text) for c in held),
        "constrained_finish": {r: sum(c.finish_reason == r for c in held)
                               for r in ("stop", "length")},
        "free_sample": free[0].text[:120], "constrained_sample": held[0].text[:120]}
    print(f"valid JSON per schema: unconstrained {validity['free_valid']}/{len(prompts)}, "
          f"constrained {validity['constrained_valid']}/{len(prompts)} "
          f"(finish {validity['constrained_finish']})", flush=True)

    # cost: mask time per call, the token choice's whole time per token (mask, logits copy,
    # per-row argmax), and batch throughput constrained vs free
    choosing = {"free": [0.0, 0.0], "constrained": [0.0, 0.0]}
    batch = prompts[:8]
    best = {"free": 0.0, "constrained": 0.0}
    with _timed(G, "allowed", lambda *_: 1) as spent, \
            _timed(C, "choose", _rows) as timing:  # sampling imports allowed at call time
        for _ in range(3):
            for name, params in (("free", SamplingParams(max_new_tokens=48)),
                                 ("constrained", SamplingParams(max_new_tokens=48,
                                                                grammar=grammar))):
                timing.update(s=0.0, n=0.0)
                t0 = time.perf_counter()
                out = gen.run(batch, params)
                rate = sum(c.completion_tokens for c in out) / (time.perf_counter() - t0)
                best[name] = max(best[name], rate)
                choosing[name][0] += timing["s"]
                choosing[name][1] += timing["n"]
    cost = {"batch": len(batch), "free_tok_s": round(best["free"], 2),
            "constrained_tok_s": round(best["constrained"], 2),
            "constrained_over_free": round(best["constrained"] / best["free"], 3),
            "mask_ms_per_token": round(1e3 * spent["s"] / max(spent["n"], 1), 3),
            "choice_ms_per_token": {k: round(1e3 * v[0] / max(v[1], 1), 3)
                                    for k, v in choosing.items()},
            "tokenizer_build_s": round(tokenizer_s, 2)}
    print(f"8 rows: free {cost['free_tok_s']} tok/s, constrained {cost['constrained_tok_s']} "
          f"tok/s ({cost['constrained_over_free']}x; constrained rows finish earlier, so "
          f"their batch thins out sooner); mask {cost['mask_ms_per_token']} ms per token; "
          f"token choice per token {cost['choice_ms_per_token']} ms; llguidance tokenizer "
          f"built in {cost['tokenizer_build_s']} s", flush=True)
    mix = _mix(gen, args.mix)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"model": args.model, "validity": validity,
                                           "cost": cost, "mix": mix}, indent=2))


if __name__ == "__main__":
    main()
