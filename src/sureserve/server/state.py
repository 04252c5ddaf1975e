"""What the server holds: one slot per served model, loaded in the background, and the
tokenizer pool that keeps tokenization and chat templates off the event loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sureserve.engine import Engine, forward_workers
from sureserve.errors import (
    InputError,
    ModelSourceError,
    NotReadyError,
    TaskMismatchError,
    TooManyInputsError,
)
from sureserve.server.batcher import Batcher
from sureserve.server.genworker import GenWorker
from sureserve.server.metrics import Metrics
from sureserve.settings import Settings

T = TypeVar("T")

log = logging.getLogger("sureserve.server")

EngineFactory = Callable[[str, Settings], Engine]
DRIFT_EVERY = 1.0  # seconds between drift evaluations (each is O(window), a few ms)


def default_factory(name: str, settings: Settings) -> Engine:
    import sureserve

    return sureserve.load(name, settings=settings)



async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a new thread that ends with it, awaited.

    Why not ``asyncio.to_thread``: an OpenMP thread pool belongs to the thread that first
    ran a parallel region, and lives as long as that thread. Model loading, gates and
    warm-ups run torch ops; done on the event loop's long-lived helper threads, they leave
    pools behind, libgomp then counts more threads than cores and makes every worker
    sleep between parallel regions instead of spinning briefly. Each of the ~200 small
    matmuls of a decode step then pays a wake-up: on 2 cores, decoding on the generation
    thread measured 17.6 tok/s against 28.5 on a process's only pool (BENCHMARKS.md).
    A thread that ends takes its pool with it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not done.done():
            (done.set_result if ok else done.set_exception)(value)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=run, name=f"once-{getattr(fn, '__name__', 'call')}",
                     daemon=True).start()
    return await done


@dataclass

class Slot:
    name: str
    state: str = "loading"  # loading | ready | failed
    reason: str | None = None
    failure: str | None = None  # the error's code when failed (gate_failed, ...)
    engine: Engine | None = None
    batcher: Batcher | None = None  # embed and classify models
    gen: GenWorker | None = None  # generation models


#: where each task's requests go (named when a request reaches the wrong kind of model)
ROUTES = {"embed": "/embed or /v1/embeddings", "sparse": "/embed_sparse",
          "classify": "/predict", "rerank": "/rerank or /v1/rerank",
          "generate": "/v1/completions or /v1/chat/completions"}


class ServerState:
    def __init__(self, settings: Settings, names: Sequence[str],
                 factory: EngineFactory = default_factory) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.slots = {n: Slot(n) for n in names}
        self.factory = factory
        self.started = int(time.time())
        # HF tokenizers encode batches in Rust without the GIL, so a small pool keeps a
        # long request's tokenizing from stalling every other request on the event loop
        self.tokenizer_pool = ThreadPoolExecutor(settings.tokenizer_workers,
                                                 thread_name_prefix="tokenize")

    async def load_all(self) -> None:
        """Load, gate and warm up every model, one after the other, off the event loop;
        then share out torch's threads and start each model's batcher or generation loop."""
        loaded = []
        for slot in self.slots.values():
            try:
                engine = await in_own_thread(self.factory, slot.name, self.settings)
                if engine.generation is None and engine.task is None:
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
        # Everything loaded so far (models, tokenizers, transformers' modules: hundreds of
        # thousands of objects) lives as long as the process. Left to the collector, each
        # full collection walks all of it holding the GIL, a spike in the latency tail
        # (BENCHMARKS.md). Frozen, they are never scanned again; only per-request garbage is.
        gc.collect()
        gc.freeze()

    def _forward_workers(self, engines: list[Engine]) -> int:
        """Forward workers per encoder model, setting torch's threads to match.

        Two single-threaded passes at once beat one two-threaded pass on the small batches
        a server sees (BENCHMARKS.md), but torch's thread count is per process, so a
        generation model served alongside keeps one worker and all the threads."""
        import torch

        chosen = forward_workers(self.settings.forward_workers,
                                 all(str(e.loaded.plan.device) == "cpu" for e in engines),
                                 any(e.generation is not None for e in engines))
        if chosen > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // chosen))
        log.info("%d forward worker(s) per model, %d torch thread(s) each", chosen,
                 torch.get_num_threads())
        return chosen

    async def _start(self, slot: Slot, engine: Engine, workers: int) -> None:
        if engine.generation is not None:
            gen = engine.generation
            await in_own_thread(gen.generate_ids, [gen.encode("Hello")], 2)  # warm-up
            slot.gen = GenWorker(slot.name, gen, self.settings, self.metrics)
            slot.gen.start()
            self.metrics.kv_budget.labels(slot.name).set(gen.kv_budget_tokens)
        else:
            slot.batcher = await in_own_thread(Batcher.warmed_up, slot.name, engine,
                                                   self.settings, self.metrics,
                                                   self.tokenizer_pool, workers)
            slot.batcher.start()
        slot.engine = engine
        report = engine.gate_report
        self.metrics.gate_passed.labels(slot.name).set(
            1 if report is None or report.passed else 0)
        slot.state = "ready"
        log.info("%s ready (%s)", slot.name, report.summary() if report else "no gate")

    def _failed(self, slot: Slot, exc: Exception) -> None:
        slot.state, slot.reason = "failed", str(exc)
        slot.failure = getattr(exc, "code", type(exc).__name__)
        self.metrics.gate_passed.labels(slot.name).set(0)
        log.error("could not serve %s: %s", slot.name, exc)

    async def watch_drift(self, every: float = DRIFT_EVERY) -> None:
        """Evaluate every ready model's drift watch, off the event loop, and publish the
        signals (metrics; /health and /info read the watches' last evaluation)."""
        while True:
            await asyncio.sleep(every)
            for slot in self.slots.values():
                watch = slot.engine.watch if slot.engine is not None else None
                if slot.state != "ready" or watch is None:
                    continue
                signals, _ = await in_own_thread(watch.evaluate)
                for s in signals:
                    if s.score is not None:
                        self.metrics.drift_score.labels(slot.name, s.name).set(s.score)
                    self.metrics.drift_alert.labels(slot.name, s.name).set(int(s.alert))

    def refresh_gauges(self) -> None:
        """Gauges read at scrape time rather than kept current on the request path."""
        for slot in self.slots.values():
            if slot.batcher:
                self.metrics.queue_depth.labels(slot.name).set(slot.batcher.depth)

    def drift_alerts(self) -> list[dict[str, Any]]:
        """Every alerting signal of every served model, with its numbers."""
        return [{"model": slot.name, **s.to_dict()} for slot in self.slots.values()
                if slot.engine is not None and slot.engine.watch is not None
                for s in slot.engine.watch.alerts]

    async def stop(self) -> None:
        for slot in self.slots.values():
            if slot.batcher:
                await slot.batcher.stop()
            if slot.gen:
                await slot.gen.stop()
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def status(self) -> Literal["ok", "degraded", "loading", "failed"]:
        states = {s.state for s in self.slots.values()}
        if "failed" in states:
            return "failed"
        if states != {"ready"}:
            return "loading"
        return "degraded" if self.drift_alerts() else "ok"

    def pick(self, name: str | None, task_name: str | None) -> tuple[Slot, Engine]:
        """The ready slot a request asks for (by name), or the first that does
        ``task_name``; ``task_name`` None: any task."""
        if name is not None:
            slot = self.slots.get(name)
            if slot is None:
                raise ModelSourceError(f"model {name!r} is not served here",
                                       f"use one of {', '.join(self.slots)} (GET /v1/models)")
            candidates = [slot]
        else:
            candidates = [s for s in self.slots.values() if s.engine is None
                          or task_name in (None, s.engine.task_name)]
        for slot in candidates:
            if slot.state != "ready" or slot.engine is None:
                raise NotReadyError(f"model {slot.name} is {slot.state}"
                                    + (f": {slot.reason}" if slot.reason else ""),
                                    "wait for GET /health to answer 200")
            if task_name is not None and slot.engine.task_name != task_name:
                raise TaskMismatchError(f"model {slot.name} does {slot.engine.task_name}, "
                                        f"not {task_name}",
                                        f"send its inputs to {ROUTES[slot.engine.task_name]}, "
                                        f"or choose a model that does {task_name}")
            return slot, slot.engine
        raise TaskMismatchError(f"no served model does {task_name}",
                                f"start the server with a model for {task_name}")

    def batcher(self, name: str | None, task_name: str) -> Batcher:
        slot, _ = self.pick(name, task_name)
        if slot.batcher is None:  # pick() returned a ready embed/classify slot
            raise NotReadyError(f"model {slot.name} has no batcher", "wait for GET /health")
        return slot.batcher

    def validate(self, inputs: str | list[str], what: str = "inputs",
                 engine: Engine | None = None) -> list[str]:
        """Texts of one request, within ``max_client_batch``; each non-empty. Empty ones
        are refused, and counted by ``engine``'s drift watch (a client that starts sending
        blanks is drift too)."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts:
            raise InputError(f"{what} is empty", "send at least one text")
        self.within_client_batch(len(texts), f"{len(texts)} {what} in one request")
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:
            if engine is not None and engine.watch is not None:
                engine.watch.observe_texts([0] * len(blank), empty=[True] * len(blank))
            raise InputError(f"input {blank[0]} is empty", "send non-empty text")
        return texts

    def within_client_batch(self, count: int, what: str) -> None:
        limit = self.settings.max_client_batch
        if count > limit:
            raise TooManyInputsError(
                f"{what}; the limit is {limit}",
                "split the request, or raise --max-client-batch (SURESERVE_MAX_CLIENT_BATCH)")
