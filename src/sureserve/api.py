"""The top-level Python API: ``load`` and ``info``."""

from __future__ import annotations

import logging
from typing import Any

from sureserve.engine import Engine
from sureserve.errors import GateError
from sureserve.gate.lock import check_quantization
from sureserve.gate.report import GateReport
from sureserve.gate.run import run_gate
from sureserve.loading import loader
from sureserve.loading.describe import describe
from sureserve.loading.precision import Recipe
from sureserve.settings import Settings

log = logging.getLogger("sureserve")


def _settings(settings: Settings | None, device: str | None, dtype: str | None,
              overrides: dict[str, Any]) -> Settings:
    base = settings.model_dump() if settings else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if device is not None:
        base["device"] = device
    if dtype is not None:
        base["dtype"] = dtype
    return Settings.build(**base)


def load(
    identifier: str,
    task: str | None = None,
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    *,
    tokenizer: str | None = None,
    settings: Settings | None = None,
    **overrides: Any,
) -> Engine:
    """Load a model and its tokenizer from one identifier, ready to run.

    ``identifier``: a zoo alias (see ``sureserve models``), a local folder, or a hub id
    already in the local Hugging Face cache (``revision`` pins it). ``task`` is inferred
    from the config when omitted. ``tokenizer`` names another tokenizer source explicitly
    (reported loudly). Any other ``Settings`` field can be passed as a keyword.

    The preflight gate runs before this returns (``engine.gate_report``); a failure raises
    ``GateError`` unless ``accept_gate_failure=True``, which is logged and reported.
    """
    engine, report = _load_and_gate(identifier, task, revision, tokenizer,
                                    _settings(settings, device, dtype, overrides))
    if not report.passed:
        if not engine.settings.accept_gate_failure:
            raise gate_error(report)
        report.overridden = True
        log.warning("GATE OVERRIDDEN (accept_gate_failure): %s", report.summary())
    if engine.settings.drift_watch:
        _watch(engine)
    return engine


def _watch(engine: Engine) -> None:
    """Give a loaded model its drift watch, with the reference file's baseline if set."""
    from sureserve import watch

    engine.watch = watch.for_engine(engine)
    if engine.generation is not None:
        engine.generation.watch = engine.watch
    ref = engine.settings.drift_reference
    if ref is not None:
        n = watch.use_reference(engine, ref.expanduser())
        log.info("drift baseline for %s: %d inputs of %s", engine.loaded.source.identifier,
                 n, ref)


def gate_error(report: GateReport) -> GateError:
    lines = "; ".join(f"{c.name}: {c.evidence}" for c in report.failures)
    fixes = "; ".join(dict.fromkeys(c.fix for c in report.failures if c.fix))
    return GateError(
        f"{report.model} (tokenizer {report.tokenizer}) failed its preflight gate: {lines}",
        f"{fixes}. Run `sureserve check {report.model}` for the full table; to load anyway, "
        "set accept_gate_failure=True / SURESERVE_ACCEPT_GATE_FAILURE=1",
    )


def check(model: str, tokenizer: str | None = None, task: str | None = None,
          revision: str | None = None, *, settings: Settings | None = None,
          **overrides: Any) -> GateReport:
    """Run the preflight gate on a model (and optionally another tokenizer); never raises
    for a failed check: the verdicts are in the returned report."""
    return _load_and_gate(model, task, revision, tokenizer,
                          _settings(settings, None, None, overrides))[1]


def _load_and_gate(identifier: str, task: str | None, revision: str | None,
                   tokenizer: str | None, s: Settings,
                   recipe: Recipe | None = None) -> tuple[Engine, GateReport]:
    """Load and run the gate; ``recipe``: quantize this way (``sureserve quantize``'s
    candidates, measured right after, so without the "not evaluated" warning)."""
    loaded = loader.load(identifier, task=task, revision=revision, settings=s, tokenizer=tokenizer,
                         recipe=recipe)
    engine = Engine(loaded, s)
    engine.gate_report = report = run_gate(loaded, engine.task)
    quantized = check_quantization(engine)
    if quantized is not None:
        report.checks.append(quantized)
    return engine, report


def info(identifier: str, task: str | None = None, revision: str | None = None,
         **overrides: Any) -> dict[str, Any]:
    """The load plan and model facts, without loading the weights."""
    return describe(identifier, task, revision, Settings.build(**overrides))


def load_locked(lock: dict[str, Any], settings: Any) -> Any:
    """The model a lockfile names, loaded the way it was locked (snapshot, tokenizer,
    device, dtype), gate failures accepted: ``verify`` reports what changed."""
    m = lock["model"]
    return load(m["identifier"], task=m["task"], revision=m["snapshot"] or m["revision"],
                tokenizer=lock.get("tokenizer_source"), device=lock["plan"]["device"],
                dtype=lock["plan"]["dtype"], settings=settings, accept_gate_failure=True,
                drift_watch=False)
