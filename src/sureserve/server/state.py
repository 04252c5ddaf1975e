"""What the server holds: one slot per served model, loaded in the background."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from sureserve.errors import (
    InputError,
    InputTooLongError,
    ModelSourceError,
    SureserveError,
    TaskMismatchError,
    TooManyInputsError,
)
from sureserve.server.batcher import Batcher
from sureserve.server.generation import GenWorker
from sureserve.server.metrics import Metrics
from sureserve.settings import Settings
from sureserve.tasks.base import merge

log = logging.getLogger("sureserve.server")

EngineFactory = Callable[[str, Settings], Any]


def default_factory(name: str, settings: Settings) -> Any:
    import sureserve

    return sureserve.load(name, settings=settings)


@dataclass
class Slot:
    name: str
    state: str = "loading"  # loading | ready | failed
    reason: str | None = None
    engine: Any = None
    batcher: Batcher | None = None
    gen: GenWorker | None = None


@dataclass
class Outcome:
    rows: np.ndarray  # merged per text
    tokens: int
    truncated: list[int] = field(default_factory=list)


class ServerState:
    def __init__(self, settings: Settings, names: Sequence[str],
                 factory: EngineFactory = default_factory) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.slots = {n: Slot(n) for n in names}
        self.factory = factory
        self.started = int(time.time())

    async def load_all(self) -> None:
        """Load, gate and warm up every model, one after the other, off the event loop;
        then share out torch's threads and start each model's batcher or generation loop."""
        loaded = []
        for slot in self.slots.values():
            try:
                engine = await asyncio.to_thread(self.factory, slot.name, self.settings)
                if engine.generator is None and engine.task is None:
                    raise TaskMismatchError(f"{slot.name} is a {engine.task_name!r} model, "
                                            "which the server cannot serve",
                                            "serve an embedding, classifier or generation model")
                loaded.append((slot, engine))
            except Exception as exc:  # reported by /health, never a crash
                self._failed(slot, exc)
        workers = self._forward_workers([e for _, e in loaded])
        for slot, engine in loaded:
            try:
                await self._start(slot, engine, workers)
            except Exception as exc:
                self._failed(slot, exc)
        # Everything loaded so far (models, tokenizers, transformers' modules: ~400k
        # objects) lives as long as the process. Left to the collector, each full
        # collection walks all of it holding the GIL: measured 220 ms during which no
        # request is parsed and no forward pass starts, a spike in the latency tail.
        # Frozen, they are never scanned again; only per-request garbage is.
        gc.collect()
        gc.freeze()

    def _forward_workers(self, engines: list[Any]) -> int:
        """Forward workers per encoder model, setting torch's threads to match.

        Two single-threaded passes at once beat one two-threaded pass on the small batches
        a server sees (minilm on 2 cores: 1.4-2x the texts/s), but torch's thread count is
        per process, so a generation model served alongside keeps one worker and all the
        threads."""
        import torch

        chosen = self.settings.forward_workers
        if chosen is None:
            cpu = all(str(e.loaded.plan.device) == "cpu" for e in engines)
            generating = any(e.generator is not None for e in engines)
            chosen = 2 if cpu and not generating and torch.get_num_threads() >= 2 else 1
        if chosen > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // chosen))
        log.info("%d forward worker(s) per model, %d torch thread(s) each", chosen,
                 torch.get_num_threads())
        return chosen

    async def _start(self, slot: Slot, engine: Any, workers: int) -> None:
        if engine.generator is not None:
            gen = engine.generator
            await asyncio.to_thread(gen.generate_ids, [gen.encode("Hello")], 2)
            slot.gen = GenWorker(slot.name, gen, self.settings, self.metrics)
            slot.gen.start()
            self.metrics.kv_budget.labels(slot.name).set(gen.kv_budget_tokens)
        else:
            task = engine.task
            # measuring the pass cost runs each shape twice: it is the warm-up too
            cost = await asyncio.to_thread(Batcher.measure_cost, task, engine.loaded.limit.value)
            log.info("%s: a forward pass costs %.0f tokens' worth plus its tokens "
                     "(attention: %.4f more per token of length)", slot.name, cost.overhead,
                     cost.attention)
            packed = await asyncio.to_thread(self._may_pack, slot.name, engine)
            slot.batcher = Batcher(slot.name, task, self.settings, self.metrics, cost, workers,
                                   packed)
            slot.batcher.start()
        slot.engine = engine
        report = engine.gate_report
        self.metrics.gate_passed.labels(slot.name).set(
            1 if report is None or report.passed else 0)
        slot.state = "ready"
        log.info("%s ready (%s)", slot.name, report.summary() if report else "no gate")

    def _may_pack(self, name: str, engine: Any) -> bool:
        """Whether to pack this model's batches: asked for, possible, and checked here on
        the gate's probe texts (packed vs one at a time) within the batch-invariance
        tolerance, so that packing can never change an answer beyond float rounding."""
        from sureserve.gate.probe_texts import DIVERSE, LONG
        from sureserve.gate.probes import INVARIANCE_TOL
        from sureserve.tasks.embed import EmbedTask

        task = engine.task
        why: str | None
        if not self.settings.packing:
            why = "turned off (SURESERVE_PACKING)"
        elif not isinstance(task, EmbedTask):
            why = "only embedding models are packed"
        else:
            why = task.packing_unsupported()
        if why is None:
            probe = task.to_pieces([*DIVERSE, LONG], "truncate").pieces
            diff = task.check_packing(probe)
            tol = INVARIANCE_TOL.get(engine.loaded.plan.dtype, 1e-4)
            if diff > tol:
                why = f"packed outputs differ from padded ones by {diff:.1e} (tolerance {tol:g})"
            else:
                log.info("%s: packed batches on (largest difference to padded %.1e)", name, diff)
                return True
        log.info("%s: packed batches off: %s", name, why)
        return False

    def _failed(self, slot: Slot, exc: Exception) -> None:
        slot.state, slot.reason = "failed", str(exc)
        self.metrics.gate_passed.labels(slot.name).set(0)
        log.error("could not serve %s: %s", slot.name, exc)

    async def stop(self) -> None:
        for slot in self.slots.values():
            if slot.batcher:
                await slot.batcher.stop()
            if slot.gen:
                await slot.gen.stop()

    @property
    def status(self) -> Literal["ok", "loading", "failed"]:
        states = {s.state for s in self.slots.values()}
        if "failed" in states:
            return "failed"
        return "ok" if states == {"ready"} else "loading"

    def pick(self, name: str | None, task: str) -> Slot:
        """The slot a request asks for, or the first ready one that does ``task``."""
        if name is not None:
            slot = self.slots.get(name)
            if slot is None:
                raise ModelSourceError(f"model {name!r} is not served here",
                                       f"use one of {', '.join(self.slots)} (GET /v1/models)")
            candidates = [slot]
        else:
            candidates = [s for s in self.slots.values()
                          if s.engine is None or s.engine.task_name == task]
        for slot in candidates:
            if slot.state != "ready":
                raise SureserveError(f"model {slot.name} is {slot.state}"
                                     + (f": {slot.reason}" if slot.reason else ""),
                                     "wait for GET /health to answer 200", http_status=503)
            if slot.engine.task_name != task:
                raise TaskMismatchError(f"model {slot.name} does {slot.engine.task_name}, "
                                        f"not {task}", "choose a model that does " + task)
            return slot
        raise TaskMismatchError(f"no served model does {task}",
                                f"start the server with a model for {task}")

    def validate(self, inputs: str | list[str]) -> list[str]:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        limit = self.settings.max_client_batch
        if not texts:
            raise InputError("inputs is empty", "send at least one text")
        if len(texts) > limit:
            raise TooManyInputsError(
                f"{len(texts)} inputs in one request; the limit is {limit}",
                "split the request, or raise --max-client-batch (SURESERVE_MAX_CLIENT_BATCH)")
        for i, t in enumerate(texts):
            if not t.strip():
                raise InputError(f"input {i} is empty", "send non-empty text")
        return texts

    async def run(self, slot: Slot, texts: list[str], truncate: bool) -> Outcome:
        """Tokenize (here, on the event loop, overlapping the running forward pass), apply
        the truncation policy, and wait for the batcher's rows."""
        assert slot.batcher is not None
        policy = "truncate" if truncate else self.settings.truncation
        try:
            res = slot.engine.task.to_pieces(texts, policy, stride=self.settings.chunk_stride)
        except InputTooLongError as exc:
            raise InputTooLongError(
                exc.message, 'send "truncate": true to cut it (the cut is counted in '
                "metrics), shorten it, or start the server with --truncation chunk",
                index=exc.index, length=exc.length, limit=exc.limit) from exc
        if res.truncated:
            self.metrics.truncated.inc(len(res.truncated))
        rows = await slot.batcher.submit(res.pieces)
        merged = merge(res.pieces, np.vstack(rows), len(texts))
        return Outcome(merged, sum(p.weight for p in res.pieces), res.truncated)
