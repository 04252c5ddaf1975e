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
import json
import time
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


def _valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("-o", "--output", type=Path)
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

    # cost: mask time per call, and batch throughput constrained vs free
    spent = {"calls": 0, "s": 0.0}
    inner = G.allowed

    def timed(matcher: Any, vocab: int) -> Any:
        t0 = time.perf_counter()
        out = inner(matcher, vocab)
        spent["s"] += time.perf_counter() - t0
        spent["calls"] += 1
        return out

    G.allowed = timed  # sampling imports it at call time
    # the token choice's whole time (mask, logits copy, per-row argmax), per token
    choosing = {"free": [0.0, 0], "constrained": [0.0, 0]}
    real_choose = C.choose
    current = ["free"]

    def choose(logits: Any, rows: Any) -> Any:
        t0 = time.perf_counter()
        out = real_choose(logits, rows)
        choosing[current[0]][0] += time.perf_counter() - t0
        choosing[current[0]][1] += len(rows)
        return out

    C.choose = choose  # the engine's module-level name
    batch = prompts[:8]
    best = {"free": 0.0, "constrained": 0.0}
    for _ in range(3):
        for name, params in (("free", SamplingParams(max_new_tokens=48)),
                             ("constrained", SamplingParams(max_new_tokens=48,
                                                            grammar=grammar))):
            current[0] = name
            t0 = time.perf_counter()
            out = gen.run(batch, params)
            rate = sum(c.completion_tokens for c in out) / (time.perf_counter() - t0)
            best[name] = max(best[name], rate)
    G.allowed, C.choose = inner, real_choose
    cost = {"batch": len(batch), "free_tok_s": round(best["free"], 2),
            "constrained_tok_s": round(best["constrained"], 2),
            "constrained_over_free": round(best["constrained"] / best["free"], 3),
            "mask_ms_per_token": round(1e3 * spent["s"] / max(spent["calls"], 1), 3),
            "choice_ms_per_token": {k: round(1e3 * v[0] / max(v[1], 1), 3)
                                    for k, v in choosing.items()},
            "tokenizer_build_s": round(tokenizer_s, 2)}
    print(f"8 rows: free {cost['free_tok_s']} tok/s, constrained {cost['constrained_tok_s']} "
          f"tok/s ({cost['constrained_over_free']}x; constrained rows finish earlier, so "
          f"their batch thins out sooner); mask {cost['mask_ms_per_token']} ms per token; "
          f"token choice per token {cost['choice_ms_per_token']} ms; llguidance tokenizer "
          f"built in {cost['tokenizer_build_s']} s", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"model": args.model, "validity": validity,
                                           "cost": cost}, indent=2))


if __name__ == "__main__":
    main()
