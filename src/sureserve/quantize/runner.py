"""Measuring one model on fixed texts: outputs, speed, weights and peak memory."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sureserve.quantize import measure as M
from sureserve.quantize import methods as Q

#: generation is measured on this many prompts of the eval split, this many new tokens;
#: perplexity on this many texts, cut to this many tokens
GEN_PROMPTS, GEN_TOKENS, NLL_TEXTS, NLL_MAX_TOKENS = 32, 32, 64, 256
#: the quick speed reading of a decoder: a short greedy decode of a few prompts
PROBE_PROMPTS, PROBE_TOKENS = 4, 8


@dataclass
class Measured:
    """One model measured on the eval split."""

    outputs: Any  # embed: vectors; classify: probabilities; generate: (token lists, nll)
    per_second: float  # texts/s (embed, classify) or generated tokens/s (generate)
    weights_mib: float
    peak_rss_mib: float


class Runner:
    """Measures models of one task on fixed texts (timing, memory, outputs)."""

    def __init__(self, task: str, texts: list[str], *, perplexity_only: bool = False) -> None:
        self.task, self.texts = task, texts
        #: decoders: skip greedy generation (the sensitivity search needs perplexity only)
        self.perplexity_only = perplexity_only

    def outputs(self, engine: Any, texts: Sequence[str] | None = None) -> Any:
        texts = list(self.texts if texts is None else texts)
        if self.task == "embed":
            return engine.run(texts, truncation="truncate").rows
        if self.task == "classify":
            return engine.task.probabilities(engine.run(texts, truncation="truncate").rows)
        if self.perplexity_only:
            return [], mean_nll(engine, texts[:NLL_TEXTS])
        prompts = texts[:GEN_PROMPTS]
        done = engine.complete(prompts, max_new_tokens=GEN_TOKENS, temperature=0.0)
        return [c.token_ids for c in done], mean_nll(engine, texts[:NLL_TEXTS])

    def probe(self, engine: Any) -> tuple[Any, float]:
        """(outputs on these texts, a quick speed reading): texts/s, or for decoders the
        tokens/s of a short greedy decode of a few prompts (decode speed is what they are
        judged on, and the perplexity pass does not show it)."""
        self.outputs(engine, self.texts[:4])  # warm-up
        started = time.perf_counter()
        out = self.outputs(engine)
        rate = len(self.texts) / max(time.perf_counter() - started, 1e-9)
        if self.task == "generate":
            started = time.perf_counter()
            done = engine.complete(self.texts[:PROBE_PROMPTS], max_new_tokens=PROBE_TOKENS,
                                   temperature=0.0)
            rate = sum(c.completion_tokens for c in done) / max(time.perf_counter() - started,
                                                                1e-9)
        return out, rate

    def measure(self, engine: Any) -> Measured:
        """Outputs and speed on every text: texts/s (best of up to 3 passes for short
        files), or for decoders the tokens/s of the greedy decode of the prompts together
        (perplexity is computed too, outside the timing)."""
        from sureserve.bench.harness import RssSampler

        if self.task == "generate":
            prompts = self.texts[:GEN_PROMPTS]
            engine.complete(prompts[:2], max_new_tokens=4, temperature=0.0)  # warm-up
            with RssSampler() as rss:
                started = time.perf_counter()
                done = engine.complete(prompts, max_new_tokens=GEN_TOKENS, temperature=0.0)
                seconds = time.perf_counter() - started
                nll = mean_nll(engine, self.texts[:NLL_TEXTS])
            tokens = [c.token_ids for c in done]
            return Measured((tokens, nll), sum(len(t) for t in tokens) / seconds,
                            Q.weights_bytes(engine.model) / 2**20, rss.peak / 2**20)
        self.outputs(engine, self.texts[:4])  # warm-up
        best: float = float("inf")
        out: Any = None
        with RssSampler() as rss:
            for _ in range(3):
                started = time.perf_counter()
                out = self.outputs(engine)
                best = min(best, time.perf_counter() - started)
                if best > 2.0:
                    break
        return Measured(out, len(self.texts) / best, Q.weights_bytes(engine.model) / 2**20,
                        rss.peak / 2**20)

    def fidelity(self, ref: Any, cand: Any, labels: list[int] | None) -> dict[str, Any]:
        if self.task == "embed":
            return M.embed_fidelity(ref, cand)
        if self.task == "classify":
            return M.classify_fidelity(ref, cand, labels)
        return M.generate_fidelity(ref[0], cand[0], ref[1], cand[1])


def mean_nll(engine: Any, texts: Sequence[str], max_tokens: int = NLL_MAX_TOKENS) -> float:
    """Mean next-token negative log-likelihood over the texts (teacher forcing)."""
    import torch

    tok, model, device = engine.tokenizer, engine.model, engine.loaded.plan.device
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tok(text)["input_ids"][:max_tokens]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids], device=device)
            total += float(model(input_ids=x, labels=x).loss) * (len(ids) - 1)
            count += len(ids) - 1
    return total / max(count, 1)
