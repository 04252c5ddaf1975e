"""How close are the served log-probabilities to a plain ``transformers`` forward?
(BENCHMARKS.md, "Generation: log-probabilities", issue #26.)

For 50 prompts cut from the realistic text mix, greedy continuations of 16 tokens with
``logprobs=5`` go through the engine together (continuous batching, so rows decode in
padded batches), and every prompt is scored alone with ``prompt_logprobs`` (echo's path).
Each value is compared with the log-softmax of one plain forward over prompt + output.

    .venv/bin/python scripts/logprobs_check.py [-o bench-results/logprobs.json]

Prints and writes the max and mean absolute differences, and how many chosen tokens were
not the plain forward's most likely one (a near-tie where batching moved the rounding).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import sureserve
from sureserve.zoo.corpora import realistic_mix


def main() -> None:
    out = Path(sys.argv[sys.argv.index("-o") + 1]) if "-o" in sys.argv else None
    m = sureserve.load("smollm2")
    gen = m.generation
    assert gen is not None
    texts = [t for t in realistic_mix(200, long_share=0.0, seed=1) if len(t) > 20][:50]
    prompts = [gen.encode(t[:300]) for t in texts]
    done = m.complete([t[:300] for t in texts], max_new_tokens=16, logprobs=5)
    gen_diffs: list[float] = []
    top_diffs: list[float] = []
    prompt_diffs: list[float] = []
    not_top = 0
    for ids, c in zip(prompts, done, strict=True):
        assert c.logprobs is not None
        with torch.inference_mode():
            logits = m.model(input_ids=torch.tensor([ids + c.token_ids])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        for k, e in enumerate(c.logprobs):
            row = lp[len(ids) - 1 + k]
            assert e.logprob is not None
            gen_diffs.append(abs(e.logprob - float(row[e.token])))
            ref = row.topk(5).values.tolist()
            top_diffs.extend(abs(v - r) for (_, v), r in zip(e.top, ref, strict=True))
            not_top += int(e.token != int(row.argmax()))
        for k, e in enumerate(gen.prompt_logprobs(ids, 5)[1:], start=1):
            assert e.logprob is not None
            prompt_diffs.append(abs(e.logprob - float(lp[k - 1, ids[k]])))
    report = {
        "prompts": len(prompts), "generated_tokens": len(gen_diffs),
        "prompt_tokens_scored": len(prompt_diffs),
        "generated_max_abs_diff": max(gen_diffs), "generated_mean_abs_diff":
            sum(gen_diffs) / len(gen_diffs),
        "top5_max_abs_diff": max(top_diffs),
        "prompt_max_abs_diff": max(prompt_diffs),
        "chosen_not_the_plain_forwards_argmax": not_top,
    }
    for k, v in report.items():
        print(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
