"""The doctor's checks on a model loaded here, in the order of the classic debug guide for
transformers in production. Each returns one ``Finding`` with the numbers it saw."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from sureserve.doctor.report import Finding, Verdict, worst
from sureserve.settings import Settings

MIB, GIB = 2**20, 2**30
#: two inputs any model must tell apart (check 1 shows their ids side by side)
KNOWN = ("The film was a delight from start to finish.", "Interest rates rose on Tuesday.")
#: gate checks that say whether the model sees the text it is given
SEEING = ("vocab-fits-embeddings", "tokenizer-family", "casing", "special-tokens",
          "unknown-tokens", "empty-ids", "alignment", "output-collapse", "batch-invariance",
          "rerank-order", "lm-affinity", "model-probes")
#: throughput below these shares of this device's measured GEMM rate
SLOW_WARN, SLOW_FAIL = 0.10, 0.02


def same_output(engine: Any) -> Finding:
    """1. Same output for different inputs: the gate's tokenizer and model checks, plus two
    known inputs' first token ids and outputs side by side."""
    report = engine.gate_report
    checks = [c for c in report.checks if c.name in SEEING] if report else []
    verdict: Verdict = worst([c.status for c in checks])
    bad = [c for c in checks if c.status in ("fail", "warn")]
    tok = engine.tokenizer
    ids = [list(tok(t)["input_ids"])[:10] for t in KNOWN]
    lines = [f"gate: {len(checks)} checks, " + ("all pass" if not bad else "; ".join(
        f"{c.name} {c.status}: {c.evidence}" for c in bad))]
    lines += [f"{t[:28]!r} -> {i}" for t, i in zip(KNOWN, ids, strict=True)]
    if ids[0] == ids[1]:
        verdict = "fail"
        lines.append("the two inputs give the SAME ids")
    lines.append(_outputs_side_by_side(engine))
    fix = "; ".join(dict.fromkeys(c.fix for c in bad if c.fix)) or \
        "use the model's own tokenizer (sureserve check MODEL --tokenizer ... shows a pairing)"
    return Finding("Same output for different inputs", "gate tokenizer/model checks; two "
                   "known inputs' ids and outputs", "\n".join(lines), verdict, fix)


def _outputs_side_by_side(engine: Any) -> str:
    try:
        if engine.task_name == "embed":
            v = engine.embed(list(KNOWN), truncation="truncate", normalize=True)
            return f"cosine between their embeddings {float(v[0] @ v[1]):.3f}"
        if engine.task_name == "classify":
            out = engine.classify(list(KNOWN), truncation="truncate")
            return "labels: " + " vs ".join(f"{o['label']} {o['score']:.3f}" for o in out)
        if engine.task_name == "generate":
            texts = engine.generate(list(KNOWN), max_new_tokens=8)
            return "continuations: " + " vs ".join(repr(t) for t in texts)
        if engine.task_name == "sparse":
            a, b = ({t["index"] for t in terms}
                    for terms in engine.embed_sparse(list(KNOWN), truncation="truncate"))
            return f"terms {len(a)} and {len(b)}, {len(a & b)} shared"
        if engine.task_name == "rerank":
            r = engine.rerank(KNOWN[0], [KNOWN[0], KNOWN[1]])
            return "relevance to the first: " + ", ".join(
                f"text {x['index']} {x['score']:.3f}" for x in r)
    except Exception as exc:  # the finding reports it; the doctor goes on
        return f"running them failed: {exc}"
    return f"(no outputs compared for {engine.task_name})"


def memory(engine: Any, settings: Settings) -> Finding:
    """2. Out of memory even with small batches: what the model holds and what a batch or
    the KV budget needs, against the free memory of its device."""
    loaded = engine.loaded
    device = str(loaded.plan.device)
    free = _free_bytes(device)
    model = loaded.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lines = [f"weights {weights / MIB:.0f} MiB on {device}; free {free / MIB:.0f} MiB"]
    if engine.generation is not None:
        gen = engine.generation
        per = gen.bytes_per_token
        budget = gen.kv_budget_tokens * per
        largest = gen.context * per
        lines.append(f"KV cache {per} bytes/token x budget {gen.kv_budget_tokens} tokens "
                     f"(kv_cache_mb {settings.kv_cache_mb:g}) = {budget / MIB:.0f} MiB; the "
                     f"largest request (full context {gen.context}) {largest / MIB:.1f} MiB")
        need = budget
        fits = int(free // max(per, 1))
        lines.append(f"what fits in free memory: {fits} tokens of cache = "
                     f"{fits // max(gen.context, 1)} sequences at full context")
        fix = (f"lower --kv-cache-mb to at most {free * 0.8 / MIB:.0f} (SURESERVE_KV_CACHE_MB),"
               " or move to a device with more memory (sureserve fit MODEL)")
    else:
        per_token = _activation_bytes_per_token(loaded)
        limit = loaded.limit.value
        heads = int(loaded.config.get("num_attention_heads") or 1)
        rows = max(1, settings.max_batch_tokens // limit)
        attn = rows * heads * limit * limit * 4  # one layer's attention scores, float32
        need = settings.max_batch_tokens * per_token + attn
        lines.append(f"one batch of max_batch_tokens {settings.max_batch_tokens}: "
                     f"~{need / MIB:.0f} MiB of activations ({per_token} bytes/token + "
                     f"attention scores at length {limit})")
        per_row = limit * per_token + heads * limit * limit * 4
        lines.append(f"what fits in free memory: {int(free * 0.8 // per_row)} texts at the "
                     f"full {limit} tokens in one batch")
        fix = (f"lower --max-batch-tokens (now {settings.max_batch_tokens}; "
               "SURESERVE_MAX_BATCH_TOKENS), or free memory on the device")
    verdict: Verdict = "fail" if need > free else "warn" if need > 0.8 * free else "pass"
    return Finding("Out of memory even with small batches", "weights, KV cache or batch "
                   "activations vs free device memory", "\n".join(lines), verdict, fix)


def _free_bytes(device: str) -> int:
    """Free memory of ``device`` now, as ``sureserve fit`` reads the machine."""
    from sureserve.loading.fit import real_machine

    machine = real_machine()
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return int(machine.gpus[index] * GIB)
    return int(machine.cpu_gib * GIB)


def _activation_bytes_per_token(loaded: Any) -> int:
    """Live activations per token in one layer of an encoder forward pass (the hidden state,
    Q, K, V, attention output and the feed-forward's inner width), at the model's dtype."""
    cfg = loaded.config
    hidden = int(cfg.get("hidden_size") or 0)
    inner = int(cfg.get("intermediate_size") or 4 * hidden)
    size = 2 if loaded.plan.dtype in ("bfloat16", "float16") else 4
    return (5 * hidden + inner) * size


def speed(engine: Any, settings: Settings) -> Finding:
    """3. 10x slower than expected: device, threads, wait policy, one forward pass against
    this device's measured GEMM rate, dtype speeds measured here, torch.compile."""
    import torch

    loaded = engine.loaded
    device = str(loaded.plan.device)
    lines: list[str] = []
    verdicts: list[Verdict] = []
    fixes: list[str] = []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines.append(f"model on {device}; visible: cpu" + (f" + {gpus} GPU(s)" if gpus else ""))
    if gpus and not device.startswith("cuda"):
        verdicts.append("fail")
        fixes.append("a GPU is free and the model runs on the CPU: --device cuda")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    threads = torch.get_num_threads()
    wait = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    lines.append(f"torch threads {threads}, cores available {cores}, OMP_WAIT_POLICY {wait}")
    if threads > cores:
        verdicts.append("warn")
        fixes.append(f"more threads than cores: set OMP_NUM_THREADS={cores} "
                     "(oversubscribed threads wait on each other)")
    if wait.upper() == "ACTIVE":
        verdicts.append("warn")
        fixes.append("OMP_WAIT_POLICY=ACTIVE spins idle threads: unset it on shared machines")
    rate, gemm, dtype = _forward_rate(engine), _gemm_rate(device, loaded.plan.dtype, settings), \
        loaded.plan.dtype
    share = rate / gemm if gemm else 0.0
    lines.append(f"one forward pass: {rate:.1f} GFLOP/s in linear layers; this device's "
                 f"{dtype} GEMM: {gemm:.1f} GFLOP/s ({share:.0%})")
    if share < SLOW_FAIL:
        verdicts.append("fail")
    elif share < SLOW_WARN:
        verdicts.append("warn")
    if share < SLOW_WARN:
        fixes.append("the model runs far below the hardware's rate: check the other lines "
                     "(device, threads), and run `sureserve bench` to compare")
    measured = {"threads": float(threads), "cores": float(cores), "forward_gflops": rate,
                "gemm_gflops": gemm, "forward_gemm_share": share}
    if not device.startswith("cuda"):
        from sureserve.loading.machine import cpu_speeds

        speeds = cpu_speeds(settings.home_dir())
        measured |= {f"{d}_vs_float32": v / max(speeds["float32"], 1e-9)
                     for d, v in speeds.items()}
        line, verdict, fix = dtype_advice(dtype, speeds)
        lines.append(line)
        if verdict is not None:
            verdicts.append(verdict)
            fixes.append(fix)
    lines.append(f"torch.compile: {_compile_available()}")
    verdict = worst(verdicts) if verdicts else "pass"
    return Finding("10x slower than expected", "device, threads, wait policy, forward rate "
                   "vs GEMM rate, dtype speeds, torch.compile", "\n".join(lines), verdict,
                   "; ".join(fixes), measured)


def dtype_advice(dtype: str, speeds: dict[str, float]) -> tuple[str, Verdict | None, str]:
    """What this CPU's measured matmul speeds (``loading/machine.cpu_speeds``) say about the
    model's dtype: the evidence line, a verdict (None: nothing to say) and the fix, which
    names the measured figure. Pure, so every machine kind is tested on any machine."""
    from sureserve.loading.machine import BF16_WORTH, SLOW_DTYPE

    rel = {d: speeds[d] / max(speeds["float32"], 1e-9) for d in speeds}
    line = "matmul speed here vs float32 (measured): " + ", ".join(
        f"{d} {r:.2f}x" for d, r in rel.items())
    if dtype in rel and rel[dtype] < SLOW_DTYPE:
        return line, "fail", (f"{dtype} runs at {rel[dtype]:.2f}x float32 on this CPU "
                              "(measured): load in float32 (--dtype float32)")
    if dtype == "float32" and rel.get("bfloat16", 0) >= BF16_WORTH:
        return line, "warn", (f"bfloat16 matmuls measured {rel['bfloat16']:.2f}x float32 here: "
                              "`sureserve quantize MODEL --methods bf16 --eval FILE` measures "
                              "what it costs")
    return line, None, ""


def _forward_rate(engine: Any) -> float:
    """Linear-layer GFLOP/s of one padded batch of 8 texts at min(128, limit) tokens, best
    of three passes (the first of a new shape pays setup)."""
    import torch

    from sureserve.batching.truncation import Piece
    from sureserve.loading.machine import linear_flops_per_token

    loaded = engine.loaded
    length = min(128, loaded.limit.value)
    flops = linear_flops_per_token(loaded.model) * 8 * length
    best = float("inf")
    if engine.task is not None:
        ids = engine.tokenizer("x")["input_ids"]
        body = [ids[-2] if len(ids) > 2 else ids[0]] * (length - 2)
        pieces = [Piece(0, [ids[0], *body, ids[-1]]) for _ in range(8)]
        for _ in range(3):
            start = time.perf_counter()
            engine.task.forward(pieces)
            best = min(best, time.perf_counter() - start)
    else:
        x = torch.full((8, length), int(engine.tokenizer("x")["input_ids"][-1]),
                       device=loaded.plan.device)
        with torch.inference_mode():
            for _ in range(3):
                start = time.perf_counter()
                loaded.model(input_ids=x)
                best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def _gemm_rate(device: str, dtype: str, settings: Settings) -> float:
    if device.startswith("cuda"):
        import torch

        a = torch.randn(4096, 4096, device=device, dtype=getattr(torch, dtype))
        torch.mm(a, a)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(a, a)
        torch.cuda.synchronize()
        return 10 * 2 * 4096**3 / (time.perf_counter() - start) / 1e9
    from sureserve.loading.machine import cpu_speeds

    return float(cpu_speeds(settings.home_dir()).get(dtype, 0.0))


def _compile_available() -> str:
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "not supported on this Python"
    except Exception as exc:
        return f"unavailable ({exc})"
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return "available" + (f" (C compiler {cc})" if cc else
                          "; no C compiler found, so inductor cannot build CPU kernels")


def truncation(engine: Any, settings: Settings, sample: Path | None) -> Finding:
    """4. Truncated or garbled text: the usable maximum and what set it, the policy,
    padding and truncation sides; with a sample file, the share of it over the limit."""
    from sureserve.textio import read_records

    limit = engine.loaded.limit
    tok = engine.tokenizer
    lines = [f"usable maximum {limit.value} tokens, set by the {limit.bound_by} (candidates: "
             + ", ".join(f"{k} {v}" for k, v in limit.candidates.items()) + ")",
             f"truncation policy {settings.truncation}; tokenizer pads on the "
             f"{getattr(tok, 'padding_side', '?')}, truncates on the "
             f"{getattr(tok, 'truncation_side', '?')} (sureserve pads and cuts itself: right "
             "for encoders, left for decoders, always keeping a text's beginning)"]
    verdict: Verdict = "pass"
    fix = ""
    if sample is not None:
        texts = []
        with open(sample, "rb") as fh:
            texts = [r.text for r in read_records(fh, sample.suffix.lower(), skip=True,
                                                  skipped=[])]
        lengths = [len(i) for i in tok(texts, truncation=False)["input_ids"]] if texts else []
        over = sum(n > limit.value for n in lengths)
        share = over / max(len(lengths), 1)
        longest = max(lengths, default=0)
        lines.append(f"sample {sample.name}: {over} of {len(lengths)} texts ({share:.1%}) are "
                     f"over {limit.value} tokens (longest {longest})")
        if over:
            verdict = "warn"
            what = {"error": "refused (413 / an error naming the text)",
                    "truncate": "cut (each reported)",
                    "chunk": "split into chunks and combined"}[settings.truncation]
            fix = (f"{share:.1%} of your texts will be {what}: choose the policy on purpose "
                   "(--truncation error|truncate|chunk), or a model with a longer limit")
    return Finding("Truncated or garbled text", "usable maximum, truncation policy, padding "
                   "and truncation sides" + (", sample lengths" if sample else ""),
                   "\n".join(lines), verdict, fix)


def multi_gpu(engine: Any, settings: Settings) -> Finding:
    """5. Fails to load on several GPUs: accelerate, each GPU's free memory, and where
    ``sureserve fit`` would put the layers."""
    import importlib.metadata as md

    from sureserve.loading.fit import fit_model, off_device, real_machine

    try:
        accel = f"accelerate {md.version('accelerate')}"
    except md.PackageNotFoundError:
        accel = "accelerate NOT installed"
    machine = real_machine()
    lines = [accel, "GPUs: " + (", ".join(f"cuda:{i} {g:.1f} GiB free"
                                          for i, g in enumerate(machine.gpus)) or "none")
             + f"; CPU {machine.cpu_gib:.1f} GiB free"]
    verdict: Verdict = "pass"
    fix = ""
    loaded = engine.loaded
    try:
        rep = fit_model(str(loaded.source.path), settings, task=loaded.task_name)
        plan = rep["plan"]
        lines.append(f"fit plan: {plan['placement']} {plan['precision'] or ''} on "
                     f"{', '.join(plan['devices']) or 'nothing'}: {plan['reasons'][0]}")
        if plan["placement"] == "refuse":
            verdict, fix = "fail", "; ".join(plan["warnings"])
        elif plan["placement"] in ("quantize", "offload"):
            verdict, fix = "warn", "; ".join(plan["warnings"])
    except Exception as exc:
        lines.append(f"fit plan: could not plan ({exc})")
        verdict = "warn"
    off = off_device(getattr(loaded.model, "hf_device_map", None), str(loaded.plan.device))
    if off:
        verdict, fix = "warn", "modules on the CPU or disk slow every step: see sureserve fit"
        lines.append(f"{len(off)} modules placed off the GPU: {', '.join(off[:4])}")
    if accel.endswith("NOT installed") and len(machine.gpus) > 1:
        verdict, fix = "fail", "pip install accelerate (needed to split a model over GPUs)"
    return Finding("Model fails to load on multi-GPU", "accelerate, free memory per device, "
                   "layer placement", "\n".join(lines), verdict, fix)


def upgrade(lock: Path | None, settings: Settings) -> Finding:
    """6. Wrong outputs after an upgrade: ``verify`` against the lockfile."""
    import json

    from sureserve.api import load_locked
    from sureserve.gate.lock import verify

    symptom, checked = "Wrong outputs after an upgrade", "verify against the lockfile"
    path = lock or Path("sureserve.lock")
    if not path.is_file():
        return Finding(symptom, checked, f"no lockfile at {path}", "skip",
                       "write one while outputs are known good: sureserve lock MODEL")
    data = json.loads(path.read_text(encoding="utf-8"))
    rep = verify(data, load_locked(data, settings))
    lines = [f"{path}: {data['model']['identifier']}; largest output drift "
             f"{rep.max_drift:.2e} (tolerance {data['outputs']['tolerance']:g})"]
    for what, items in (("versions", rep.versions), ("files", rep.files),
                        ("tokenizer", rep.tokenizer), ("outputs", rep.outputs)):
        if items:
            lines.append(f"{what}: " + "; ".join(items[:3]) + (" ..." if len(items) > 3
                                                                else ""))
    verdict: Verdict = "pass" if rep.ok else "fail"
    if rep.ok and (rep.versions or rep.files):
        verdict = "warn"
    return Finding(symptom, checked, "\n".join(lines), verdict,
                   "" if verdict == "pass" else "pin the versions and files the lockfile "
                   "names (or, if the change is wanted, check outputs and re-lock)")


def empty_ids(engine: Any) -> Finding:
    """7. The tokenizer returns empty input_ids: probe texts give ids and decode back."""
    from sureserve.gate.probes import check_round_trip

    c = check_round_trip(engine.tokenizer)
    return Finding("Tokenizer returns empty input_ids", "probe texts: ids non-empty, "
                   "decode round trip", c.evidence, c.status, c.fix)
