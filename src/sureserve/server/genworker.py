"""The server's side of generation: one stepping thread per model, events to asyncio.

``GenWorker`` runs ``GenerationEngine.step`` on its own thread whenever there is work, so
the event loop only forwards text deltas (delivered thread-safely into one asyncio queue
per HTTP request). Backpressure: the engine's ``submit`` refuses a request that could
never fit the KV budget or the context (413) and one that would take the waiting
sequences past ``max_queue_inputs`` (429), before anything is queued. A consumer that
stops listening (client gone) has its sequences cancelled: their cache rows are freed at
the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sureserve.errors import OverloadedError
from sureserve.generation.continuous import GenerationEngine, GenEvent
from sureserve.generation.sampling import SamplingParams
from sureserve.server.metrics import Metrics
from sureserve.settings import Settings


class GenWorker:
    def __init__(self, name: str, engine: GenerationEngine, settings: Settings,
                 metrics: Metrics) -> None:
        self.name, self.engine, self.settings, self.metrics = name, engine, settings, metrics
        self._wake = threading.Event()
        self._stopping = False
        self._prefix_seen = (0, 0, 0, 0)  # the prefix cache's counters already exported
        # model work outside the batch (echo's prompt log-probabilities), run on this
        # thread between steps: one thread drives the model, its OpenMP pool stays warm
        self._jobs: deque[tuple[Callable[[], Any], asyncio.Future[Any],
                                asyncio.AbstractEventLoop]] = deque()
        self._thread = threading.Thread(target=self._run, name=f"generate-{name}", daemon=True)

    def start(self) -> None:
        if self.engine.prefix is not None:  # exported at 0 from the start, not first use
            m = self.metrics
            for metric in (m.prefix_hits, m.prefix_misses, m.prefix_tokens,
                           m.prefix_evictions, m.prefix_bytes):
                metric.labels(self.name)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        m, engine = self.metrics, self.engine
        while not self._stopping:
            while self._jobs:
                fn, fut, loop = self._jobs.popleft()
                try:
                    res, exc = fn(), None
                except Exception as e:  # the caller's request fails, not the worker
                    res, exc = None, e
                loop.call_soon_threadsafe(_settle, fut, res, exc)
            if not engine.has_work:
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            start = time.perf_counter()
            engine.step()  # never raises for a bad request: those finish with an error
            m.step_seconds.labels(self.name).observe(time.perf_counter() - start)
            m.gen_running.labels(self.name).set(engine.running)
            m.gen_waiting.labels(self.name).set(engine.waiting)
            m.kv_reserved.labels(self.name).set(engine.reserved_tokens)
            m.kv_bytes.labels(self.name).set(engine.cache_bytes)
            if (pc := engine.prefix) is not None:  # counters move by what this step added
                seen = self._prefix_seen
                now = (pc.hits, pc.misses, pc.tokens_reused, pc.evictions)
                for counter, a, b in zip((m.prefix_hits, m.prefix_misses, m.prefix_tokens,
                                          m.prefix_evictions), now, seen, strict=True):
                    if a > b:
                        counter.labels(self.name).inc(a - b)
                self._prefix_seen = now
                m.prefix_bytes.labels(self.name).set(pc.bytes)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the stepping thread, between two steps; its result (or error)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._jobs.append((fn, fut, loop))
        self._wake.set()
        return await fut

    def cancel(self, ids: Iterable[int]) -> None:
        """Stop these sequences (their client is gone); freed at the next step."""
        for rid in ids:
            self.engine.cancel(rid)
        self._wake.set()

    def submit(self, prompts: Sequence[list[int]], params: SamplingParams) -> Events:
        """Queue the prompts now (or refuse them: 429 over capacity, 413 never fits), so
        that a refusal comes before a stream's 200; returns their events as (prompt index,
        event) pairs until every prompt finished. Closing the events early, or dropping
        them unread, cancels the rest."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenEvent] = asyncio.Queue()
        m, name = self.metrics, self.name

        def on_event(ev: GenEvent) -> None:  # runs on the stepping thread
            if ev.finish_reason not in ("cancelled", "error"):  # one event = one token
                (m.ttft if ev.first else m.itl).labels(name).observe(ev.wait_s)
                if ev.queued_s is not None:
                    m.gen_queue.labels(name).observe(ev.queued_s)
                m.gen_tokens.labels(name).inc()
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        try:
            ids = self.engine.submit(prompts, params, on_event, self.settings.max_queue_inputs)
        except OverloadedError:
            self.metrics.rejected.inc()
            raise
        self._wake.set()
        return Events(self, ids, queue)


def _settle(fut: asyncio.Future[Any], res: Any, exc: BaseException | None) -> None:
    if not fut.done():  # the request may have gone meanwhile
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(res)


class Events:
    """One request's generation events. ``close`` (idempotent) cancels every sequence
    that has not finished; it also runs when the object is dropped, so a request that
    never started reading (its client left before the stream began, or a handler
    raised in between) does not keep generating for nobody."""

    def __init__(self, worker: GenWorker, ids: list[int],
                 queue: asyncio.Queue[GenEvent]) -> None:
        self._worker, self._queue = worker, queue
        self._index = {rid: k for k, rid in enumerate(ids)}
        self._open = set(ids)

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> tuple[int, GenEvent]:
        if not self._open:
            raise StopAsyncIteration
        ev = await self._queue.get()
        if ev.finish_reason is not None:
            self._open.discard(ev.seq_id)
        return self._index[ev.seq_id], ev

    def close(self) -> None:
        if self._open:
            self._worker.cancel(self._open)
            self._open = set()

    def __del__(self) -> None:
        self.close()
