"""Deliberately broken model/tokenizer pairs, for the gate's tests and its calibration.

Each function writes a tokenizer (or model) folder derived from a good one. They exist so
that every failure the gate claims to catch is reproduced from the real packaged models.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "chat_template.jinja")


def copy_tokenizer(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
    return dest


def _edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def shuffled_tokenizer(src: Path, dest: Path, seed: int = 0) -> Path:
    """Same vocabulary and size, but the token→id map of ordinary tokens permuted.

    Special tokens keep their ids, so nothing about the vocabulary's size or specials gives
    the swap away: only what the ids mean to the model changes.
    """
    copy_tokenizer(src, dest)
    (dest / "vocab.txt").unlink(missing_ok=True)  # tokenizer.json is the source of truth

    def edit(data: dict[str, Any]) -> None:
        vocab: dict[str, int] = data["model"]["vocab"]
        special = {t["id"] for t in data.get("added_tokens", [])}
        movable = sorted((tok for tok, i in vocab.items() if i not in special),
                         key=lambda t: vocab[t])
        ids = [vocab[t] for t in movable]
        random.Random(seed).shuffle(ids)
        for t, i in zip(movable, ids, strict=True):
            vocab[t] = i

    _edit_json(dest / "tokenizer.json", edit)
    return dest


def casing_flipped_tokenizer(src: Path, dest: Path) -> Path:
    """A WordPiece tokenizer whose normalizer no longer lowercases (uncased vocab kept)."""
    copy_tokenizer(src, dest)

    def edit(data: dict[str, Any]) -> None:
        data["normalizer"]["lowercase"] = not data["normalizer"].get("lowercase", False)

    _edit_json(dest / "tokenizer.json", edit)
    if (dest / "tokenizer_config.json").is_file():
        _edit_json(dest / "tokenizer_config.json",
                   lambda d: d.update(do_lower_case=not d.get("do_lower_case", True)))
    return dest


def no_pad_tokenizer(src: Path, dest: Path) -> Path:
    """The tokenizer with its pad token removed (an explicit null: some tokenizer classes
    would otherwise fall back to a default pad token)."""
    copy_tokenizer(src, dest)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (dest / name).is_file():
            _edit_json(dest / name, lambda d: d.update(pad_token=None))
    return dest


def long_max_length_tokenizer(src: Path, dest: Path, claimed: int = 100_000) -> Path:
    copy_tokenizer(src, dest)
    _edit_json(dest / "tokenizer_config.json", lambda d: d.update(model_max_length=claimed))
    return dest


def padded_embeddings_model(src: Path, dest: Path, extra_rows: int = 64) -> Path:
    """The model with its input embedding matrix padded by ``extra_rows`` unused rows."""
    from transformers import AutoModel

    shutil.copytree(src, dest)
    model = AutoModel.from_pretrained(src)
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + extra_rows)
    model.save_pretrained(dest)
    return dest


def empty_ids_tokenizer(src: Path, dest: Path) -> Path:
    """A tokenizer whose normalizer deletes every character: every text gives no content
    ids (only the special tokens), the "empty input_ids" symptom of a broken tokenizer
    file or an over-eager cleaning step."""
    copy_tokenizer(src, dest)
    (dest / "vocab.txt").unlink(missing_ok=True)

    def edit(data: dict[str, Any]) -> None:
        data["normalizer"] = {"type": "Replace", "pattern": {"Regex": "[\\s\\S]"},
                              "content": ""}

    _edit_json(dest / "tokenizer.json", edit)
    # transformers 5's BertTokenizer rebuilds its normalizer from its own options: the
    # generic class takes tokenizer.json as it is
    _edit_json(dest / "tokenizer_config.json",
               lambda c: c.update(tokenizer_class="PreTrainedTokenizerFast"))
    return dest


def with_tokenizer(model: Path, tokenizer: Path, dest: Path) -> Path:
    """A model folder holding ``model``'s weights and config with ``tokenizer``'s files."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.is_file() and f.name not in TOKENIZER_FILES:
            shutil.copy(f, dest / f.name)
    return copy_tokenizer(tokenizer, dest)
