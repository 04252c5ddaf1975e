"""Drift watch on live traffic: build one per loaded model, feed it a reference file.

``for_engine`` is called by ``sureserve.load`` (unless ``drift_watch`` is off); the engine
and the generation loop then report what they see to ``engine.watch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sureserve.watch.drift import DriftWatch, Signal, Stats, count_unknown

__all__ = ["DriftWatch", "Signal", "for_engine", "unknown_id", "use_reference"]
REFERENCE_MAX = 10  # windows of a reference file read at most (its first lines)


def unknown_id(tok: Any) -> int | None:
    """The tokenizer's unknown-token id, when it can actually emit one. Byte-level BPE
    tokenizers (GPT-2, Llama 3, SmolLM) spell any text in bytes, and often name some
    end-of-text token as "unk" anyway: those have no unknown-token signal."""
    from sureserve.gate.static import tokenizer_family

    unk = getattr(tok, "unk_token_id", None)
    backend = getattr(tok, "backend_tokenizer", None)
    model_unk = getattr(getattr(backend, "model", None), "unk_token", "?")
    if unk is None or "byte-level" in tokenizer_family(tok) or model_unk is None:
        return None
    others = {getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return None if unk in others else int(unk)


def for_engine(engine: Any) -> DriftWatch:
    """A watch for a loaded engine, anchored on the gate's probe texts."""
    from sureserve.gate import probe_texts as P

    loaded = engine.loaded
    tok = loaded.tokenizer
    unk = unknown_id(tok)
    labels = list(getattr(engine.task, "labels", []) or []) if engine.task_name == "classify" \
        else []
    anchor = Stats()
    probes = [*P.DIVERSE, P.PARAGRAPH]
    for ids in tok(probes, add_special_tokens=False)["input_ids"]:
        anchor.add_text(len(ids), count_unknown(ids, unk), False, False)
    if engine.task_name in ("embed", "sparse") and engine.task is not None:
        from sureserve.watch.signals import unit_rows

        rows = engine.task.forward(engine.task.to_pieces(P.DIVERSE, "truncate").pieces)
        anchor.unit_sum = unit_rows(rows).sum(axis=0)
        anchor.vectors = len(rows)
        if engine.task_name == "sparse":
            anchor.active = int((rows > 0).sum())
    return DriftWatch(loaded.source.identifier, engine.task_name, engine.settings, labels,
                      unk, anchor)


def use_reference(engine: Any, path: Path) -> int:
    """Run a file of typical inputs (any format the CLI reads; at most ten windows of it)
    through the model as the watch's baseline. Returns how many inputs it held.

    Texts over the limit are cut for the run (and counted as over the limit, as the live
    ones will be, whatever the policy); a generation model's reference gives the prompt
    side only (its outputs' baseline is the first window of traffic)."""
    from sureserve.errors import SettingsError
    from sureserve.textio import read_records

    watch: DriftWatch = engine.watch
    if not path.is_file():
        raise SettingsError(f"no reference file at {path}",
                            "give --drift-reference a .txt, .jsonl or .csv file of typical "
                            "inputs (SURESERVE_DRIFT_REFERENCE)")
    texts: list[str] = []
    with open(path, "rb") as fh:
        for rec in read_records(fh, path.suffix.lower(), skip=True, skipped=[]):
            texts.append(rec.text)
            if len(texts) >= REFERENCE_MAX * watch.size:
                break
    if len(texts) < watch.min_inputs:
        raise SettingsError(f"the reference file {path} holds {len(texts)} inputs; the watch "
                            f"needs at least {watch.min_inputs}", "add typical inputs to it")
    with watch.recording(str(path)):
        if engine.generation is not None or engine.task_name == "rerank":
            # prompts without completions; a reranker's texts without a query to pair them
            ids = [engine.generation.encode(t) for t in texts] if engine.generation \
                else engine.task.preprocess(texts)
            watch.observe_texts([len(i) for i in ids],
                                [count_unknown(i, watch.unknown_id) for i in ids],
                                [len(i) > engine.loaded.limit.value for i in ids],
                                [not t.strip() for t in texts])
        else:
            engine.run(texts, truncation="truncate" if engine.settings.truncation == "error"
                       else None)
    return len(texts)

