"""Load a tokenizer and a model together, following a LoadPlan.

The tokenizer comes from the model's own folder unless the caller names another source;
then the report carries a loud warning, because a mismatched tokenizer is the classic way
to get confident, wrong answers with no error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sureserve.errors import ModelSourceError
from sureserve.loading import precision as Q
from sureserve.loading.fit import off_device
from sureserve.loading.inspect import (
    AUTO_CLASSES,
    STConfig,
    TokenLimit,
    infer_task,
    read_json,
    sentence_transformers_config,
    usable_max,
)
from sureserve.loading.machine import bound_onednn_cache
from sureserve.loading.plan import LoadPlan, detect_caps, make_plan
from sureserve.loading.source import Source, resolve, vet_weights
from sureserve.settings import Settings

log = logging.getLogger("sureserve.loading")


@dataclass
class Loaded:
    """Everything a task needs: model, tokenizer, and how they were chosen."""

    model: Any
    tokenizer: Any
    source: Source
    tokenizer_source: Source
    task_name: str  # embed | classify | generate
    plan: LoadPlan
    config: dict[str, Any]
    st: STConfig | None
    limit: TokenLimit
    warnings: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    #: the tokenizer had no pad token and eos is used in its place (decoders)
    pad_from_eos: bool = False
    quantization: Q.Recipe | None = None

    @property
    def precision(self) -> str:
        """The quantization method when there is one, else the dtype: what tolerances and
        lockfiles are keyed by."""
        return self.quantization.method if self.quantization else self.plan.dtype

    @property
    def hidden_size(self) -> int:
        """Width of the model's states: the dimension of its embeddings."""
        return int(self.config.get("hidden_size") or 0)


def load_tokenizer(source: Source, trust_remote_code: bool = False) -> Any:
    """The tokenizer, under the same ``trust_remote_code`` as its model (off by default:
    a tokenizer class shipped as code runs only when the user opted in)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.path),
                                             trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelSourceError(f"could not load a tokenizer from {source.path}: {exc}",
                               "check that the folder holds tokenizer.json or its vocab files") \
            from exc


def load(
    identifier: str,
    task: str | None = None,
    revision: str | None = None,
    settings: Settings | None = None,
    tokenizer: str | None = None,
    recipe: Q.Recipe | None = None,
) -> Loaded:
    import transformers

    settings = settings or Settings()
    bound_onednn_cache(settings.onednn_cache_capacity)
    started = time.perf_counter()
    source = resolve(identifier, revision, settings)
    config = read_json(source.path / "config.json")
    task = infer_task(source.path, config, task)
    use_safetensors = vet_weights(source.path, settings.allow_pickle)
    caps = detect_caps(settings.home_dir())
    recipe = recipe or quantization_recipe(source.path, settings)
    method = Q.get(recipe.method) if recipe else None
    dtype, attn = settings.dtype, settings.attn_implementation
    if method is not None:  # the method decides the dtype (and attention, for bf16-flash)
        dtype, attn = method.dtype, method.attn or attn
    plan = make_plan(caps, settings.device, dtype, attn)
    if method is not None and Q.dtype_on(method, plan.device) != plan.dtype:
        plan = make_plan(caps, settings.device, Q.dtype_on(method, plan.device), attn)
    warnings = list(plan.warnings)
    if method is not None and recipe is not None:
        why = Q.unavailable(method, task, plan.device, caps)
        if why:
            raise ModelSourceError(f"quantization {method.name} cannot be used here: {why}",
                                   "load the base model, or run `sureserve quantize` on this "
                                   "machine to choose a method that runs here")
        if not recipe.evaluated:
            warnings.append(
                f"quantization {method.name} is NOT EVALUATED on your data: its cost in "
                "accuracy is unknown (torch's int8 minilm embeddings measured cosine 0.89 with "
                "fp32 here). Measure it: "
                f"`sureserve quantize {identifier} --eval FILE --methods {method.name} -o DIR`, "
                "then load DIR")

    tok_source = source
    if tokenizer is not None and tokenizer != identifier:
        tok_source = resolve(tokenizer, None, settings, need_config=False)
        warnings.append(f"TOKENIZER OVERRIDE: the tokenizer comes from {tokenizer!r}, not from "
                        f"the model's own folder {identifier!r}; outputs are only right if the "
                        "two were trained together")
    tok = load_tokenizer(tok_source, settings.trust_remote_code)

    extra = Q.load_kwargs(method, recipe.keep, plan.device) if method and recipe else {}
    if plan.device.startswith("cuda") and not extra:
        extra = gpu_placement(source.path, config, task, settings, warnings)
    model = _load_model(getattr(transformers, AUTO_CLASSES[task]), source, task, plan,
                        use_safetensors, settings, warnings, extra)
    off = off_device(getattr(model, "hf_device_map", None), plan.device)
    if off:
        warnings.append(f"{len(off)} modules were placed on the CPU or disk, not the GPU "
                        f"({', '.join(off[:4])}): a single layer on the CPU becomes the "
                        "bottleneck; see `sureserve fit` for a placement that avoids it")
    if getattr(model, "hf_device_map", None) is None:  # bitsandbytes places its own weights
        model.to(plan.device)
    model.eval()
    if method is not None and recipe is not None:
        from sureserve.loading import kernels

        left = kernels.apply(model, method, recipe.keep, recipe.calibration)
        if left:
            warnings.append(f"{len(left)} linear layers stay in full precision because "
                            f"{method.name}'s kernel cannot take their shape: "
                            + ", ".join(left[:5]))
        if method.name == "bnb-int8" and plan.device == "cpu":
            # bitsandbytes logs this on every forward pass; it is said once here instead
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
            warnings.append("bnb-int8 on the CPU casts activations to float16 inside each "
                            "8-bit matmul (bitsandbytes' CPU path)")

    st = sentence_transformers_config(source.path)
    limit = usable_max(config, getattr(tok, "model_max_length", None), st)
    pad_from_eos = _prepare_decoder_tokenizer(tok, warnings) if task == "generate" else False
    for w in warnings:
        log.warning(w)
    return Loaded(model, tok, source, tok_source, task, plan, config, st, limit, warnings,
                  time.perf_counter() - started, pad_from_eos, recipe)


def gpu_placement(folder: Any, config: dict[str, Any], task: str, settings: Settings,
                  warnings: list[str]) -> dict[str, Any]:
    """``from_pretrained`` arguments that apply ``sureserve fit``'s plan on this machine's
    GPUs: nothing when one device holds the model, a balanced ``device_map`` across GPUs
    when together they do, CPU offload only when allowed; otherwise an error with the plan."""
    from sureserve.loading.fit import ModelSize, plan_fit, real_machine
    from sureserve.loading.inspect import kv_bytes_per_token, parameter_count

    if settings.device not in (None, "cuda"):
        return {}  # one GPU was named: the user placed it
    params = parameter_count(folder) or 0
    kv = kv_bytes_per_token(config, "bfloat16") if task == "generate" else None
    machine = real_machine()
    _, plan = plan_fit(ModelSize(params, 0, int(kv or 0)), machine, settings.kv_cache_mb,
                       settings.allow_offload)
    warnings.extend(plan.warnings)
    if plan.placement == "single":
        return {}
    if plan.placement in ("split", "offload"):
        gib = plan.max_memory or {d: g - 1.0 for d, g in
                                  zip((f"cuda:{i}" for i in range(len(machine.gpus))),
                                      machine.gpus, strict=True)}
        memory: dict[Any, str] = {int(d.split(":")[1]): f"{g:.1f}GiB" for d, g in gib.items()}
        if plan.placement == "offload":
            memory["cpu"] = f"{machine.cpu_gib:.1f}GiB"
        return {"device_map": "auto", "max_memory": memory}
    what = (f"in 16-bit; {plan.precision} would" if plan.placement == "quantize"
            else "at any precision")
    raise ModelSourceError(
        f"the model does not fit this machine's GPUs {what}: " + "; ".join(plan.reasons[:1]),
        "quantize it (`sureserve quantize MODEL --eval FILE`), or --allow-offload to run it "
        "slowly from CPU memory; `sureserve fit MODEL` shows every option")


def quantization_recipe(folder: Any, settings: Settings) -> Q.Recipe | None:
    """A quantized folder's own recipe, or the ``quantization`` setting (not evaluated)."""
    stored = Q.read_recipe(folder)
    wanted = settings.quantization
    if stored is not None:
        if wanted is not None and wanted != stored.method:
            raise ModelSourceError(
                f"{folder} was quantized with {stored.method}, and {wanted} was asked for",
                "drop --quantization (the folder's own method applies), or quantize the "
                f"base model {stored.base} instead")
        return stored
    return Q.Recipe(Q.get(wanted).name) if wanted is not None else None


def _load_model(cls: Any, source: Source, task: str, plan: LoadPlan, use_safetensors: bool,
                settings: Settings, warnings: list[str], extra_kwargs: dict[str, Any]) -> Any:
    """from_pretrained with our plan; weights left out of the checkpoint become a warning.

    transformers prints its own load report; we take its facts instead (so that a head that
    was initialised at random is stated in our report, not lost in a log).
    """
    import torch
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = dict(
        dtype=getattr(torch, plan.dtype), attn_implementation=plan.attn_implementation,
        use_safetensors=use_safetensors, trust_remote_code=settings.trust_remote_code,
        output_loading_info=True, **extra_kwargs)
    # Embeddings pool the token states themselves: BERT-style pooler heads would be computed
    # for nothing (and their weights are often untrained).
    extra = {"add_pooling_layer": False} if task == "embed" else {}
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            model, info = cls.from_pretrained(str(source.path), **extra, **kwargs)
        except TypeError:
            model, info = cls.from_pretrained(str(source.path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"could not load the model in {source.path}: {exc}",
                               "check that the folder is a complete transformers model") from exc
    finally:
        hf_logging.set_verbosity(before)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        warnings.append(f"{len(missing)} weights are not in the checkpoint and were initialised "
                        f"at random: {shown}; outputs that depend on them are meaningless")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        warnings.append(f"{len(mismatched)} weights had the wrong shape and were re-initialised")
    return model


def _prepare_decoder_tokenizer(tok: Any, warnings: list[str]) -> bool:
    """Decoder batching needs left padding and a pad token (pad = eos is the usual fix).

    Returns whether eos had to stand in for a missing pad token.
    """
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelSourceError("the tokenizer has neither a pad nor an eos token",
                                   "set pad_token in tokenizer_config.json")
        tok.pad_token = tok.eos_token
        warnings.append(f"pad token was missing: using eos {tok.eos_token!r} as pad, with "
                        "left padding")
        return True
    return False
