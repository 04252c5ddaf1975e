"""Run every check and probe that fits a loaded model, and gather the report."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np

from sureserve.gate import probe_texts as P
from sureserve.gate import probes, static
from sureserve.gate.report import Check, GateReport
from sureserve.loading.fit import off_device
from sureserve.loading.loader import Loaded

log = logging.getLogger("sureserve.gate")


def run_gate(loaded: Loaded, task_impl: Any | None = None) -> GateReport:
    """All checks for ``loaded``; ``task_impl`` is its embed/classify Task (None: generate)."""
    started = time.perf_counter()
    tok = loaded.tokenizer
    report = GateReport(loaded.source.identifier, loaded.tokenizer_source.identifier)
    emb = loaded.model.get_input_embeddings().weight.detach().float().cpu().numpy()
    model_type = str(loaded.config.get("model_type", ""))
    layout = (task_impl.prefix, task_impl.suffix) if task_impl is not None else (0, 0)
    vocab = static.check_vocab(tok, emb.shape[0])
    report.checks += [
        vocab,
        static.check_family(model_type, tok),
        static.check_casing(tok),
        *static.check_special_tokens(loaded.task_name, model_type, tok, layout,
                                     loaded.pad_from_eos),
        static.check_max_length(loaded.config, tok),
        probes.check_unknown_rate(tok),
        round_trip := probes.check_round_trip(tok),
        probes.check_alignment(tok, emb),
    ]
    if vocab.status == "fail":
        # Running the model would index past its embedding matrix: stop here.
        report.checks.append(Check("model-probes", "skip",
                                   "not run: token ids would index past the embeddings"))
    elif round_trip.status == "fail":
        report.checks.append(Check("model-probes", "skip",
                                   "not run: the tokenizer gives the model no text"))
    elif loaded.task_name == "generate":
        report.checks += _decoder_probes(loaded)
    elif task_impl is not None:
        report.checks += _encoder_probes(loaded, task_impl)
    off = off_device(getattr(loaded.model, "hf_device_map", None), loaded.plan.device)
    if off:
        report.checks.append(Check(
            "placement", "warn", f"{len(off)} modules run from the CPU or disk: "
            + ", ".join(off[:4]), "a single layer on the CPU becomes the bottleneck: see "
            "`sureserve fit MODEL` (quantize, or more GPU memory)"))
    report.seconds = time.perf_counter() - started
    return report


def _rerank_probes(loaded: Loaded, task: Any) -> list[Check]:
    queries = [q for q, _ in P.RERANK_PAIRS]
    passages = [p for _, p in P.RERANK_PAIRS]
    rows = []
    alone = []
    for k, q in enumerate(queries):
        pieces = task.to_pieces([*passages, P.LONG], "truncate", query=q).pieces
        # every passage in one padded batch next to a much longer text; one of them alone
        rows.append(task.forward(pieces)[: len(passages), 0])
        alone.append(task.forward([pieces[k]])[0, 0])
    scores = np.asarray(rows)
    together = np.asarray([scores[k, k] for k in range(len(queries))])
    return [probes.check_rerank_order(scores),
            probes.check_invariance(np.asarray(alone), together, loaded.precision,
                                    "relevance logits")]


def _encoder_probes(loaded: Loaded, task: Any) -> list[Check]:
    if task.name == "rerank":
        return _rerank_probes(loaded, task)
    texts = P.DIVERSE
    if task.name == "sparse":
        texts = [*P.DIVERSE, P.PARAGRAPH]
    pieces = task.to_pieces([*texts, P.LONG], "truncate").pieces
    # (a) every probe text in one padded batch next to a much longer text, (b) each alone
    together = task.forward(pieces)[: len(texts)]
    alone = np.vstack([task.forward([p]) for p in pieces[: len(texts)]])
    if task.name == "sparse":
        return [probes.check_sparse_active(together),
                probes.check_sparse_terms(loaded.tokenizer, texts, together),
                probes.check_invariance(alone, together, loaded.precision, "sparse weights")]
    if task.name == "embed":
        out = task.postprocess(together, normalize=True)
        return [probes.check_embed_collapse(out),
                probes.check_invariance(task.postprocess(alone, normalize=True), out,
                                        loaded.precision, "unit embeddings")]
    probs_together = task.probabilities(together)
    return [probes.check_classify_collapse(probs_together, task.labels),
            probes.check_invariance(task.probabilities(alone), probs_together,
                                    loaded.precision, "class probabilities")]


def _decoder_probes(loaded: Loaded) -> list[Check]:
    import torch

    model, tok = loaded.model, loaded.tokenizer
    device = loaded.plan.device
    prompts = [list(tok(p)["input_ids"]) for p in P.PROMPTS]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding: the last column is every prompt's end
        ids[row, longest - len(p):] = torch.tensor(p)
        mask[row, longest - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        batched = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device)).logits[:, -1].float().softmax(-1)
        alone = torch.cat([model(input_ids=torch.tensor([p], device=device)).logits[:, -1]
                           .float().softmax(-1) for p in prompts])
        text_ids = tok(P.PARAGRAPH, return_tensors="pt")["input_ids"].to(device)
        loss = float(model(input_ids=text_ids, labels=text_ids).loss)
        order = list(range(text_ids.shape[1]))
        random.Random(0).shuffle(order)
        shuffled_ids = text_ids[:, order]
        shuffled = float(model(input_ids=shuffled_ids, labels=shuffled_ids).loss)
    next_tokens = [tok.decode([int(i)]) for i in alone.argmax(-1).tolist()]
    return [
        probes.check_generate_collapse(next_tokens),
        probes.check_invariance(alone.cpu().numpy(), batched.cpu().numpy(), loaded.precision,
                                "next-token probabilities (left padding, positions from mask)"),
        probes.check_lm_affinity(loss, shuffled),
    ]
