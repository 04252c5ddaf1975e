"""Does torch.compile take the per-token overhead out of a CPU decode step? (BENCHMARKS.md,
"Generation: compiling the decode step"). One-row greedy decode of smollm2 fp32 through
sureserve's engine (64 new tokens, best of 3), in one of three modes:

- ``eager``: as served;
- ``pieces``: the per-layer elementwise work compiled (RMSNorm, SiLU x up, rotary), the
  matmuls and attention left to eager, shapes dynamic;
- ``whole``: the model's forward compiled (dynamic shapes, default mode).

    .venv/bin/python scripts/decode_compile.py eager|pieces|whole [--profile]

Prints the first call's time (compilation), tok/s, and whether the tokens equal eager's.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from transformers.models.llama import modeling_llama as ML

import sureserve


def _pieces(model: Any) -> None:
    @torch.compile(dynamic=True)
    def norm(h: Any, w: Any, eps: float) -> Any:
        dt = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(dt)

    @torch.compile(dynamic=True)
    def act(g: Any, u: Any) -> Any:
        return torch.nn.functional.silu(g) * u

    @torch.compile(dynamic=True)
    def rope(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def half(x: Any) -> Any:
            n = x.shape[-1] // 2
            return torch.cat((-x[..., n:], x[..., :n]), dim=-1)
        return q * cos + half(q) * sin, k * cos + half(k) * sin

    for m in model.modules():
        if isinstance(m, ML.LlamaRMSNorm):
            m.forward = (lambda self, h: norm(h, self.weight, self.variance_epsilon)).__get__(m)
        elif isinstance(m, ML.LlamaMLP):
            m.forward = (lambda self, x: self.down_proj(act(self.gate_proj(x),
                                                            self.up_proj(x)))).__get__(m)
    ML.apply_rotary_pos_emb = rope


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "eager"
    gen = sureserve.load("smollm2", decode_weight_layout=False).generation
    prompts = [gen.encode([{"role": "user", "content": "Write a short note about rivers "
                                                       "and why they matter."}])]

    def run(n: int) -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        out = gen.generate_ids(prompts, n)
        return n / (time.perf_counter() - t), out

    _, ref = run(64)
    torch._dynamo.config.cache_size_limit = 64
    if mode == "pieces":
        _pieces(gen.model)
    elif mode == "whole":
        gen.model.forward = torch.compile(gen.model.forward, dynamic=True)
    t0 = time.perf_counter()
    run(8)
    print(f"first call (compilation) {time.perf_counter() - t0:.1f} s")
    rates, out = [], ref
    for _ in range(3):
        r, out = run(64)
        rates.append(r)
    print(f"{mode}: {max(rates):.2f} tok/s (best of 3), tokens equal eager's: {out == ref}")
    if "--profile" in sys.argv:
        from torch.profiler import profile

        with profile() as p:
            run(16)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
