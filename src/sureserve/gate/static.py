"""Static checks: from the config, the tokenizer and the embedding matrix's shape alone."""

from __future__ import annotations

from typing import Any

from sureserve.gate.report import Check
from sureserve.loading.inspect import position_limit

# What the tokenizer's model should be for a model type. A type not listed has no
# expectation (the check is skipped and says so).
WORDPIECE_TYPES = {"bert", "distilbert", "electra", "mobilebert", "squeezebert", "funnel",
                   "layoutlm", "convbert", "megatron-bert", "nezha", "ernie", "roc_bert"}
BPE_TYPES = {"gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "mixtral", "qwen2",
             "qwen3", "qwen2_moe", "phi", "phi3", "roberta", "bart", "codegen", "olmo", "olmo2",
             "falcon", "starcoder2", "gemma", "gemma2", "gemma3", "granite", "smollm3",
             "deberta"}
UNIGRAM_TYPES = {"t5", "mt5", "umt5", "xlm-roberta", "albert", "camembert", "xlnet", "mbart",
                 "pegasus", "deberta-v2"}
#: encoders trained with [CLS] text [SEP] framing
CLS_SEP_TYPES = WORDPIECE_TYPES


def tokenizer_family(tok: Any) -> str:
    """'WordPiece', 'BPE', 'Unigram', 'WordLevel' (+ ' byte-level') or 'unknown'."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return "unknown"
    name = type(backend.model).__name__
    pre = repr(backend.pre_tokenizer) if backend.pre_tokenizer is not None else ""
    return name + (" byte-level" if "ByteLevel" in pre else "")


def lowercases(tok: Any) -> bool | None:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return getattr(tok, "do_lower_case", None)
    if backend.normalizer is None:
        return False
    return bool(backend.normalizer.normalize_str("Hello WORLD") == "hello world")


def cased_vocab_share(tok: Any) -> float:
    """Share of alphabetic vocabulary entries that contain an uppercase letter."""
    special = set(tok.all_special_tokens)
    alpha = upper = 0
    for piece in tok.get_vocab():
        if piece in special or piece.startswith("[unused") or piece.startswith("<"):
            continue
        word = piece.lstrip("#Ġ▁")
        if word.isalpha():
            alpha += 1
            upper += any(c.isupper() for c in word)
    return upper / max(alpha, 1)


def max_token_id(tok: Any) -> int:
    ids = list(tok.get_vocab().values()) + list(tok.all_special_ids)
    return max(ids) if ids else -1


def check_vocab(tok: Any, rows: int) -> Check:
    top = max_token_id(tok)
    n = len(tok)
    if top >= rows:
        return Check("vocab-fits-embeddings", "fail",
                     f"the tokenizer can emit ids up to {top} ({n} tokens) but the model's input "
                     f"embedding matrix has {rows} rows: those ids index past its end",
                     "use the tokenizer saved with this model (drop --tokenizer), or resize the "
                     "model's embeddings if tokens were added on purpose")
    if rows > top + 1:
        return Check("vocab-fits-embeddings", "pass",
                     f"all {n} tokenizer ids < {rows} embedding rows; {rows - top - 1} extra rows "
                     "(a padded vocabulary, which is harmless)")
    return Check("vocab-fits-embeddings", "pass",
                 f"tokenizer ids 0..{top} match the {rows} embedding rows exactly")


def check_family(model_type: str, tok: Any) -> Check:
    fam = tokenizer_family(tok)
    expected = ("WordPiece" if model_type in WORDPIECE_TYPES else
                "BPE" if model_type in BPE_TYPES else
                "Unigram" if model_type in UNIGRAM_TYPES else None)
    if expected is None or fam == "unknown":
        return Check("tokenizer-family", "skip",
                     f"no expectation for model type {model_type!r} (tokenizer: {fam})")
    if not fam.startswith(expected):
        return Check("tokenizer-family", "fail",
                     f"model type {model_type!r} expects a {expected} tokenizer, "
                     f"but this tokenizer is {fam} ({type(tok).__name__})",
                     "load the tokenizer that was saved with the model")
    return Check("tokenizer-family", "pass", f"{fam} tokenizer for model type {model_type!r}")


def check_casing(tok: Any) -> Check:
    lower = lowercases(tok)
    share = cased_vocab_share(tok)
    if lower is None:
        return Check("casing", "skip", "the tokenizer's normalizer cannot be inspected")
    evidence = (f"{share:.1%} of alphabetic vocab entries contain uppercase; the tokenizer "
                f"{'lowercases' if lower else 'does not lowercase'} input")
    if share < 0.01 and not lower:
        return Check("casing", "fail", "uncased vocabulary but " + evidence +
                     ": capitalised words become [UNK] or odd fragments",
                     "use the model's own tokenizer, or set do_lower_case / a lowercasing "
                     "normalizer")
    if share > 0.05 and lower and "WordPiece" in tokenizer_family(tok):
        return Check("casing", "fail", "cased vocabulary but " + evidence +
                     ": the capitalised half of the vocabulary can never be produced",
                     "use the model's own tokenizer (a cased model needs a cased tokenizer)")
    return Check("casing", "pass", evidence)


def check_special_tokens(task: str, model_type: str, tok: Any, layout: tuple[int, int],
                         pad_from_eos: bool = False) -> list[Check]:
    out: list[Check] = []
    if task == "generate":
        if tok.eos_token is None:
            out.append(Check("special-tokens", "fail", "the tokenizer has no eos token: "
                             "generation could never stop by itself",
                             "set eos_token in tokenizer_config.json"))
        elif pad_from_eos:
            out.append(Check("special-tokens", "warn",
                             f"no pad token: using eos {tok.eos_token!r} as pad with left padding "
                             "(applied)", "set pad_token in tokenizer_config.json to silence this"))
        else:
            out.append(Check("special-tokens", "pass",
                             f"eos={tok.eos_token!r} pad={tok.pad_token!r}, left padding"))
        return out
    if tok.pad_token is None:
        out.append(Check("special-tokens", "fail", "the tokenizer has no pad token, so texts "
                         "cannot be batched", "use the model's own tokenizer, or set pad_token"))
        return out
    if model_type in CLS_SEP_TYPES:
        prefix, suffix = layout
        if tok.cls_token is None or tok.sep_token is None or prefix < 1 or suffix < 1:
            out.append(Check("special-tokens", "fail",
                             f"{model_type} was trained on [CLS] text [SEP], but the tokenizer "
                             f"adds {prefix} token(s) before and {suffix} after "
                             f"(cls={tok.cls_token!r}, sep={tok.sep_token!r})",
                             "use the model's own tokenizer"))
            return out
    out.append(Check("special-tokens", "pass",
                     f"pad={tok.pad_token!r}" + (f" cls={tok.cls_token!r} sep={tok.sep_token!r}"
                                                  if tok.cls_token else "")))
    return out


def check_max_length(config: dict[str, Any], tok: Any) -> Check:
    pos = position_limit(config)
    claimed = getattr(tok, "model_max_length", None)
    if claimed is None or claimed >= 1_000_000:
        return Check("max-length", "pass" if pos else "skip",
                     f"tokenizer declares no limit; the model's {pos} positions apply"
                     if pos else "neither tokenizer nor model declares a length limit")
    if pos and claimed > pos:
        return Check("max-length", "warn",
                     f"tokenizer model_max_length {claimed} exceeds the model's {pos} "
                     f"positions; capped at {pos}",
                     "set model_max_length in tokenizer_config.json to the model's limit")
    return Check("max-length", "pass", f"tokenizer {claimed} <= model positions {pos}")
