"""Tool calls, structured output and the direct decode step on a real second decoder
family: the zoo's qwen-coder (Qwen2.5-Coder-0.5B-Instruct, qwen2 architecture; built on
first use, ~0.5 GB of downloads and 2.4 GB on disk). BENCHMARKS.md "Generation: tool calls
on qwen-coder". Prints: load + gate time, the decode path, greedy tokens against
``model.generate``, tool_choice auto on a question that needs the tool and on one that does
not, a json_schema answer, and one-row decode speed.

    .venv/bin/python scripts/tools_check.py
"""

from __future__ import annotations

import time

import sureserve
from sureserve.generation.sampling import SamplingParams

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}]
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
    "type": "object", "required": ["name", "age"],
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}}}


def main() -> None:
    t = time.perf_counter()
    engine = sureserve.load("qwen-coder")
    print(f"load + gate {time.perf_counter() - t:.1f} s, gate passed: "
          f"{engine.gate_report and engine.gate_report.passed}")
    gen = engine.generation
    assert gen is not None
    print("decode path:", gen.decode_path())
    for prompt in ("def fibonacci(n):", "The capital of France is"):
        ids = engine.tokenizer(prompt, return_tensors="pt")
        ref = engine.model.generate(**ids, max_new_tokens=24, do_sample=False)
        ref_ids = ref[0, ids["input_ids"].shape[1]:].tolist()
        got = gen.run([ids["input_ids"][0].tolist()], SamplingParams(max_new_tokens=24))
        print(f"{prompt!r}: greedy tokens equal model.generate's: {ref_ids == got[0].token_ids}")
    for question in ("What's the weather in Paris right now?", "Write a haiku about the sea."):
        t = time.perf_counter()
        (c,) = engine.complete([[{"role": "user", "content": question}]], tools=WEATHER,
                               max_new_tokens=80)
        print(f"{question!r} (tool_choice auto) -> {c.finish_reason}: "
              f"{c.tool_calls or repr(c.text[:100])} ({time.perf_counter() - t:.1f} s)")
    (c,) = engine.complete([[{"role": "user", "content": "Give me a person with name and age "
                              "as JSON."}]], response_format=PERSON, max_new_tokens=60)
    print(f"json_schema -> {c.finish_reason}: {c.text}")
    t = time.perf_counter()
    gen.generate_ids([engine.tokenizer("Once upon a time")["input_ids"]], 32)
    print(f"one row: {32 / (time.perf_counter() - t):.1f} tok/s (fp32, 2 GB of weights)")


if __name__ == "__main__":
    main()
