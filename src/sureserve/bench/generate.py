"""``sureserve bench generate``: continuous batching against the two usual baselines.

One workload (mixed prompt lengths, mixed max_new_tokens, greedy) is run, in one process:

- ``one-at-a-time``: ``model.generate`` per request (the first ``sample`` requests: it is
  slow, and a rate does not need all of them);
- ``static-C``: the requests in arrival order, in left-padded batches of C, each batch run
  by ``model.generate`` to its longest max_new_tokens (what a plain batched deployment does);
- ``sureserve-C``: our engine with C closed-loop clients: each client sends its next request
  as soon as its previous one finished; requests join and leave the running batch between
  steps.

Output tokens count what each request really gets (its own max_new_tokens, cut after eos).
Time to first token is measured from when a request could start (its client sent it, or
its static batch started) to its first token. Greedy outputs of every contender are
compared token for token with one-at-a-time ``generate``.
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.errors import TaskMismatchError
from sureserve.loading.machine import RssSampler


@dataclass
class Req:
    prompt: list[int]
    max_new: int


@dataclass
class Phase:
    name: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    peak_kv_mb: float | None = None
    identical: int | None = None  # outputs equal to one-at-a-time, of those compared
    compared: int | None = None
    same_as_first_full: int | None = None  # outputs equal to the first all-requests phase

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ttft")
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        d["ttft_p50_s"] = round(float(np.percentile(self.ttft, 50)), 3) if self.ttft else None
        d["ttft_p99_s"] = round(float(np.percentile(self.ttft, 99)), 3) if self.ttft else None
        d["seconds"] = round(self.seconds, 2)
        return d


def workload(tok: Any, n: int, seed: int, min_prompt: int = 8, max_prompt: int = 160,
             min_new: int = 16, max_new: int = 128) -> list[Req]:
    """Prompts cut from the realistic text mix at random lengths; random max_new_tokens."""
    from sureserve.zoo.corpora import realistic_mix

    rng = random.Random(seed)
    texts = realistic_mix(n * 4, long_share=0.3, seed=seed)
    reqs: list[Req] = []
    for t in texts:
        ids = list(tok(t)["input_ids"])
        if len(ids) < min_prompt:
            continue
        cut = rng.randint(min_prompt, min(max_prompt, len(ids)))
        reqs.append(Req(ids[:cut], rng.randint(min_new, max_new)))
        if len(reqs) == n:
            break
    return reqs


def _cut(tokens: Sequence[int], max_new: int, eos: set[int]) -> list[int]:
    out: list[int] = []
    for t in tokens[:max_new]:
        out.append(int(t))
        if t in eos:
            break
    return out


class _FirstToken:
    """A logits processor that only notes when generation produced its first scores."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def run_static(model: Any, reqs: Sequence[Req], size: int, pad_id: int, eos: set[int],
               name: str) -> tuple[Phase, list[list[int]]]:
    import torch
    from transformers import LogitsProcessorList

    outs: list[list[int]] = []
    ttft: list[float] = []
    tokens = 0
    with RssSampler() as rss, torch.inference_mode():
        start = time.perf_counter()
        for g in range(0, len(reqs), size):
            group = reqs[g:g + size]
            width = max(len(r.prompt) for r in group)
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for i, r in enumerate(group):
                ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
                mask[i, width - len(r.prompt):] = 1
            hook = _FirstToken()
            t0 = time.perf_counter()
            res = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max(r.max_new for r in group),
                                 pad_token_id=pad_id,
                                 logits_processor=LogitsProcessorList([hook]))
            for i, r in enumerate(group):
                got = _cut(res[i, width:].tolist(), r.max_new, eos)
                outs.append(got)
                tokens += len(got)
                ttft.append((hook.at or time.perf_counter()) - t0)
        seconds = time.perf_counter() - start
    phase = Phase(name, size, len(reqs), tokens, seconds, ttft, rss.peak / 2**20)
    return phase, outs


def run_engine(gen: Any, reqs: Sequence[Req], clients: int,
               name: str) -> tuple[Phase, list[list[int]]]:
    """Closed loop: ``clients`` requests in flight; each finished one is replaced at once."""
    from sureserve.generation.sampling import SamplingParams

    outs: dict[int, list[int]] = {}
    ttft: list[float] = []
    pending = list(range(len(reqs)))[::-1]
    inflight: dict[int, int] = {}  # engine seq id -> request index
    peak_kv = 0

    def send() -> None:
        k = pending.pop()
        r = reqs[k]
        (seq,) = gen.submit([r.prompt], SamplingParams(max_new_tokens=r.max_new), on_event)
        inflight[seq] = k

    def on_event(ev: Any) -> None:
        if ev.first:
            ttft.append(ev.wait_s)
        if ev.completion is not None:
            outs[inflight.pop(ev.seq_id)] = ev.completion.token_ids

    with RssSampler() as rss:
        start = time.perf_counter()
        while pending or inflight:
            while pending and len(inflight) < clients:
                send()
            gen.step()
            peak_kv = max(peak_kv, gen.cache_bytes)
        seconds = time.perf_counter() - start
    return Phase(name, clients, len(reqs), sum(len(o) for o in outs.values()), seconds, ttft,
                 rss.peak / 2**20, peak_kv / 2**20), [outs[k] for k in range(len(reqs))]


def run_generate_bench(model: str = "smollm2", n: int = 64, sample: int = 16,
                       levels: Sequence[int] = (1, 8, 32), seed: int = 0,
                       min_new: int = 16, max_new: int = 128,
                       out: Path | None = None) -> dict[str, Any]:
    """Run every contender on one workload; return (and write) the report."""
    import torch

    import sureserve

    engine = sureserve.load(model)
    gen = engine.generation
    if gen is None:
        raise TaskMismatchError(f"{model} is not a generation model", "use a causal LM")
    tok, lm = engine.tokenizer, engine.model
    reqs = workload(tok, n, seed, min_new=min_new, max_new=max_new)
    if len(reqs) < n:
        raise RuntimeError(f"the corpus gave only {len(reqs)} prompts")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = gen.eos_ids
    head = reqs[:sample]
    # warm-up (first calls allocate and pick kernels)
    gen.generate_ids([reqs[0].prompt], 4)
    lm.generate(input_ids=torch.tensor([reqs[0].prompt]), max_new_tokens=4, do_sample=False,
                pad_token_id=pad)

    phases: list[Phase] = []
    ref_phase, ref = run_static(lm, head, 1, pad, eos, "one-at-a-time")
    phases.append(ref_phase)
    print(_line(ref_phase), flush=True)

    first_full: list[list[int]] = []

    def compare(phase: Phase, outs: list[list[int]]) -> None:
        phase.compared = len(head)
        phase.identical = sum(a == b for a, b in zip(outs[:len(head)], ref, strict=False))
        if len(outs) == len(reqs):  # every request: check against the first such phase
            if not first_full:
                first_full.extend(outs)
            phase.same_as_first_full = sum(a == b for a, b in zip(outs, first_full,
                                                                  strict=True))

    for c in levels:
        todo = head if c == 1 else reqs
        ours, outs = run_engine(gen, todo, c, f"sureserve-{c}")
        compare(ours, outs)
        phases.append(ours)
        print(_line(ours), flush=True)
        if c > 1:
            st, souts = run_static(lm, todo, c, pad, eos, f"static-{c}")
            compare(st, souts)
            phases.append(st)
            print(_line(st), flush=True)

    by = {p.name: p for p in phases}
    ratios: dict[str, float] = {}
    for c in levels:
        ours_p = by[f"sureserve-{c}"]
        ratios[f"sureserve-{c}/one-at-a-time"] = round(ours_p.tokens_per_s / ref_phase.tokens_per_s,
                                                       2)
        if f"static-{c}" in by:
            ratios[f"sureserve-{c}/static-{c}"] = round(
                ours_p.tokens_per_s / by[f"static-{c}"].tokens_per_s, 2)
    report = {
        "model": model, "requests": n, "one_at_a_time_sample": len(head), "seed": seed,
        "max_new_tokens": [min_new, max_new],
        "prompt_tokens": [min(len(r.prompt) for r in reqs), max(len(r.prompt) for r in reqs)],
        "kv_bytes_per_token": gen.bytes_per_token,
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or
        platform.machine(),
        "phases": [p.row() for p in phases], "ratios": ratios,
    }
    for k, v in ratios.items():
        print(f"{k}: {v}x")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def _line(p: Phase) -> str:
    r = p.row()
    same = f", identical {p.identical}/{p.compared}" if p.compared else ""
    if p.same_as_first_full is not None:
        same += f", same as first full run {p.same_as_first_full}/{p.requests}"
    kv = f", peak KV {r['peak_kv_mb']:.0f} MiB" if p.peak_kv_mb is not None else ""
    return (f"{p.name:>16}: {p.requests} req, {p.output_tokens} tok in {r['seconds']}s = "
            f"{r['tokens_per_s']} tok/s, TTFT p50 {r['ttft_p50_s']}s p99 {r['ttft_p99_s']}s, "
            f"peak RSS {p.peak_rss_mb:.0f} MiB{kv}{same}")


def print_report(rep: dict[str, Any], log: Callable[[str], None]) -> None:
    """The report as a table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    t = Table("contender", "clients", "requests", "out tok/s", "TTFT p50 s", "TTFT p99 s",
              "peak RSS MiB", "peak KV MiB", "= one-at-a-time", "= first full run",
              title="generate (greedy; outputs compared token for token)")
    for r in rep["phases"]:
        t.add_row(r["name"], str(r["concurrency"]), str(r["requests"]), str(r["tokens_per_s"]),
                  str(r["ttft_p50_s"]), str(r["ttft_p99_s"]), f"{r['peak_rss_mb']:.0f}",
                  "-" if r["peak_kv_mb"] is None else f"{r['peak_kv_mb']:.0f}",
                  "ref" if r["compared"] is None else f"{r['identical']}/{r['compared']}",
                  "-" if r["same_as_first_full"] is None
                  else f"{r['same_as_first_full']}/{r['requests']}")
    Console(width=200).print(t)
    for k, v in rep["ratios"].items():
        log(f"{k}: {v}x")
