"""Facts read from a model folder without loading the weights: config, task, limits, files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sureserve.errors import TaskMismatchError

#: the transformers class each task loads with (the loader, and ``fit``'s empty-weights
#: model)
AUTO_CLASSES = {"embed": "AutoModel", "classify": "AutoModelForSequenceClassification",
                "rerank": "AutoModelForSequenceClassification",
                "generate": "AutoModelForCausalLM", "sparse": "AutoModelForMaskedLM"}

TASKS = ("embed", "classify", "generate", "rerank", "sparse")
# Models whose position ids start after the padding index (fairseq heritage): they can embed
# max_position_embeddings - pad_token_id - 1 tokens, not max_position_embeddings.
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "bart")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class STConfig:
    """The parts of a sentence-transformers folder that change outputs."""

    pooling: str  # "mean" | "cls" | "max" | "lasttoken"
    normalize: bool
    max_seq_length: int | None
    #: a SparseEncoder folder's SpladePooling: (pooling_strategy, activation_function)
    splade: tuple[str, str] | None = None
    #: config_sentence_transformers.json: named prompts, and the one applied by default
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    #: the Pooling module's include_prompt (False: prompt tokens are left out of the mean)
    include_prompt: bool = True


def sentence_transformers_config(path: Path) -> STConfig | None:
    modules_file = path / "modules.json"
    if not modules_file.is_file() and not (path / "sentence_bert_config.json").is_file():
        return None
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    pooling = "mean"
    normalize = False
    splade = None
    include_prompt = True
    for mod in modules:
        kind = str(mod.get("type", ""))
        if kind.endswith("SpladePooling"):
            cfg = read_json(path / mod.get("path", "") / "config.json")
            splade = (str(cfg.get("pooling_strategy", "max")),
                      str(cfg.get("activation_function", "relu")))
        elif kind.endswith("Pooling"):
            cfg = read_json(path / mod.get("path", "") / "config.json")
            pooling = _pooling_mode(cfg)
            include_prompt = bool(cfg.get("include_prompt", True))
        elif kind.endswith("Normalize"):
            normalize = True
    st = read_json(path / "sentence_bert_config.json")
    max_len = st.get("max_seq_length")
    model_cfg = read_json(path / "config_sentence_transformers.json")
    prompts = {str(k): str(v) for k, v in (model_cfg.get("prompts") or {}).items()}
    default = model_cfg.get("default_prompt_name")
    return STConfig(pooling, normalize, int(max_len) if max_len else None, splade, prompts,
                    str(default) if default else None, include_prompt)


def _pooling_mode(cfg: dict[str, Any]) -> str:
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    if cfg.get("pooling_mode_lasttoken"):
        return "lasttoken"
    return "mean"


def architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else f"{config.get('model_type', 'unknown')} (no architectures)"


def head_kind(config: dict[str, Any]) -> str:
    """'classify', 'generate', 'masked-lm' or 'encoder' from the config's architecture."""
    arch = architecture(config)
    if arch.endswith("ForSequenceClassification"):
        return "classify"
    if arch.endswith("ForMaskedLM"):
        return "masked-lm"
    if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return "generate"
    return "encoder"


def num_labels(config: dict[str, Any]) -> int:
    return int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)


def infer_task(path: Path, config: dict[str, Any], requested: str | None) -> str:
    """The task to run; a requested task the model cannot do is an error naming what it is."""
    head = head_kind(config)
    st = sentence_transformers_config(path)
    is_st = st is not None
    found = f"{architecture(config)}" + (" in a sentence-transformers folder" if is_st else "")
    if requested is None:
        if st is not None and st.splade is not None:
            return "sparse"  # a SparseEncoder folder: its pooling is SPLADE's
        if is_st:
            return "embed"
        if head == "classify" and num_labels(config) == 1:
            return "rerank"  # one output read from a (query, text) pair: a cross-encoder
        return "embed" if head in ("encoder", "masked-lm") else head
    if requested not in TASKS:
        raise TaskMismatchError(f"unknown task {requested!r}", f"use one of {', '.join(TASKS)}")
    # a plain masked-LM checkpoint (BERT's own) stays an encoder by default: only a
    # SparseEncoder folder or an explicit task="sparse" reads its vocabulary logits
    ok = {"embed": head in ("encoder", "classify", "masked-lm"),
          "classify": head == "classify",
          "rerank": head == "classify",
          "generate": head == "generate",
          "sparse": head == "masked-lm"}[requested]
    if not ok:
        can = {"generate": "generate", "classify": "classify or embed",
               "masked-lm": "sparse or embed"}.get(head, "embed")
        raise TaskMismatchError(
            f"task {requested!r} does not fit this model: found {found}, which can {can}",
            f"drop --task to use {can.split()[0]!r}, or choose a model with the right head",
        )
    return requested


@dataclass(frozen=True)
class TokenLimit:
    """The usable maximum input length in tokens, and which limit set it."""

    value: int
    bound_by: str
    candidates: dict[str, int]


def position_limit(config: dict[str, Any]) -> int | None:
    n = config.get("max_position_embeddings") or config.get("n_positions") \
        or config.get("max_sequence_length")
    if not n:
        return None
    n = int(n)
    if config.get("model_type") in OFFSET_POSITIONS and config.get("pad_token_id") is not None:
        n -= int(config["pad_token_id"]) + 1
    return n


def usable_max(
    config: dict[str, Any], tokenizer_max: int | None, st: STConfig | None
) -> TokenLimit:
    cands: dict[str, int] = {}
    # tokenizers without a limit report a huge sentinel (int(1e30)); ignore those.
    if tokenizer_max and tokenizer_max < 1_000_000:
        cands["tokenizer model_max_length"] = int(tokenizer_max)
    pos = position_limit(config)
    if pos:
        cands["model max_position_embeddings"] = pos
    if st and st.max_seq_length:
        cands["sentence-transformers max_seq_length"] = st.max_seq_length
    if not cands:
        return TokenLimit(512, "fallback (no limit declared anywhere)", {})
    bound = min(cands, key=lambda k: cands[k])
    return TokenLimit(cands[bound], bound, cands)


def files_with_sizes(path: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            out.append({"name": str(p.relative_to(path)), "bytes": p.stat().st_size})
    return out


def parameter_count(path: Path) -> int | None:
    """Parameters stored in the safetensors files, read from their headers only."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="np") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(config: dict[str, Any], dtype: str) -> int | None:
    """2 (K and V) x layers x kv heads x head dim x dtype size, for decoder models."""
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    if not (layers and heads and hidden):
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return int(2 * layers * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 4))
