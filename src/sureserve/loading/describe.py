"""``sureserve info``: the plan and why, plus facts about the model folder and tokenizer.

Reads headers and configs only; the weights are not loaded, so it is quick on any model.
"""

from __future__ import annotations

from typing import Any

from sureserve.loading.inspect import (
    architecture,
    files_with_sizes,
    infer_task,
    kv_bytes_per_token,
    parameter_count,
    position_limit,
    read_json,
    sentence_transformers_config,
    usable_max,
)
from sureserve.loading.loader import Loaded, load_tokenizer
from sureserve.loading.plan import LoadPlan, detect_caps, make_plan
from sureserve.loading.precision import read_recipe
from sureserve.loading.source import Source, resolve, vet_weights
from sureserve.settings import Settings


def describe(identifier: str, task: str | None = None, revision: str | None = None,
             settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings()
    source = resolve(identifier, revision, settings)
    config = read_json(source.path / "config.json")
    task = infer_task(source.path, config, task)
    vet_weights(source.path, settings.allow_pickle)
    plan = make_plan(detect_caps(settings.home_dir()), settings.device, settings.dtype,
                     settings.attn_implementation)
    tok = load_tokenizer(source, settings.trust_remote_code)
    d = _facts(source, source, task, plan, config, tok)
    recipe = read_recipe(source.path)
    d["quantization"] = recipe.summary() if recipe else None
    if d["kv_cache_bytes_per_token"]:
        d["kv_cache_budget"] = {"mb": settings.kv_cache_mb, "tokens": int(
            settings.kv_cache_mb * 2**20 // d["kv_cache_bytes_per_token"])}
    return d


def describe_loaded(loaded: Loaded) -> dict[str, Any]:
    d = _facts(loaded.source, loaded.tokenizer_source, loaded.task_name, loaded.plan,
               loaded.config, loaded.tokenizer)
    d["warnings"] = list(loaded.warnings)
    q = loaded.quantization
    d["quantization"] = q.summary() if q else None
    d["device_map"] = getattr(loaded.model, "hf_device_map", None)
    d["load_seconds"] = round(loaded.load_seconds, 2)
    return d


def _facts(source: Source, tok_source: Source, task: str, plan: LoadPlan,
           config: dict[str, Any], tok: Any) -> dict[str, Any]:
    st = sentence_transformers_config(source.path)
    limit = usable_max(config, getattr(tok, "model_max_length", None), st)
    kv = kv_bytes_per_token(config, plan.dtype) if task == "generate" else None
    return {
        "identifier": source.identifier,
        "source": source.kind,
        "revision": source.revision,
        "path": str(source.path),
        "tokenizer_path": str(tok_source.path),
        "tokenizer_overridden": tok_source.path != source.path,
        "task": task,
        "architecture": architecture(config),
        "model_type": config.get("model_type"),
        "parameters": parameter_count(source.path),
        "config_vocab_size": config.get("vocab_size"),
        "tokenizer_vocab_size": len(tok),
        "tokenizer_class": type(tok).__name__,
        "max_position_embeddings": position_limit(config),
        "tokenizer_model_max_length": _finite(getattr(tok, "model_max_length", None)),
        "usable_max_tokens": limit.value,
        "usable_max_bound_by": limit.bound_by,
        "special_tokens": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "sentence_transformers": (
            {"pooling": st.pooling, "normalize": st.normalize, "max_seq_length": st.max_seq_length,
             "prompts": st.prompts, "default_prompt_name": st.default_prompt_name,
             "splade": list(st.splade) if st.splade else None}
            if st else None),
        "labels": config.get("id2label") if task == "classify" else None,
        "chat_template": bool(getattr(tok, "chat_template", None)),
        "kv_cache_bytes_per_token": kv,
        "plan": plan.to_dict(),
        "files": files_with_sizes(source.path),
    }


def _finite(n: int | None) -> int | None:
    return int(n) if n is not None and n < 1_000_000 else None


def _quantization_line(q: dict[str, Any] | None) -> str | None:
    if not q:
        return None
    how = "measured and accepted by sureserve quantize" if q["evaluated"] else "NOT evaluated"
    return (f"{q['method']} ({len(q['full_precision_layers'])} layers kept in full precision; "
            f"{how}; base {q['base_model']})")


def print_info(d: dict[str, Any], out: Any) -> None:
    """``sureserve info``'s human-readable form of ``describe``."""
    from rich.table import Table

    plan = d["plan"]
    out.print(f"[bold]{d['identifier']}[/] ({d['source']}) → {d['path']}")
    t = Table(show_header=False, box=None)
    params = d["parameters"]
    for k, v in [
        ("task", d["task"]), ("architecture", f"{d['architecture']} ({d['model_type']})"),
        ("parameters", f"{params:,}" if params else "unknown"),
        ("vocab (config / tokenizer)", f"{d['config_vocab_size']} / {d['tokenizer_vocab_size']} "
                                      f"({d['tokenizer_class']})"),
        ("max positions", d["max_position_embeddings"]),
        ("usable max tokens", f"{d['usable_max_tokens']} (set by {d['usable_max_bound_by']})"),
        ("special tokens", ", ".join(f"{k}={v}" for k, v in d["special_tokens"].items())),
        ("sentence-transformers", d["sentence_transformers"]),
        ("labels", d["labels"]),
        ("chat template", d["chat_template"]),
        ("KV cache bytes/token", d["kv_cache_bytes_per_token"]),
        ("KV cache budget", f"{d['kv_cache_budget']['mb']:g} MiB = "
                            f"{d['kv_cache_budget']['tokens']:,} tokens (--kv-cache-mb)"
         if d.get("kv_cache_budget") else None),
        ("plan", f"device={plan['device']} dtype={plan['dtype']} "
                 f"attention={plan['attn_implementation']}"),
        ("quantization", _quantization_line(d.get("quantization"))),
    ]:
        if v is not None:
            t.add_row(f"[bold]{k}[/]", str(v))
    out.print(t)
    for r in plan["reasons"]:
        out.print(f"  why: {r}", highlight=False)
    for w in plan["warnings"]:
        out.print(f"  [yellow]warning:[/] {w}", highlight=False)
    ft = Table("file", "bytes")
    for f in d["files"]:
        ft.add_row(f["name"], f"{f['bytes']:,}")
    out.print(ft)
