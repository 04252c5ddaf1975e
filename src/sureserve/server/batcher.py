"""Dynamic batching for the server: requests from many clients share forward passes.

``Batcher.infer`` is the one method the embed/classify routes call, and the batcher owns
a request's whole life there, like TEI's ``Infer``: the texts are tokenized and cut to the
truncation policy on the tokenizer pool (``Engine.prepare``, off the event loop), their
pieces wait in the batcher's queue (the one registry of queued work), one loop per model
takes the batch holding the oldest piece (``oldest_batch``, pure) whenever a forward worker
is free and runs ``task.forward`` (or ``forward_packed``) on that worker's thread, and the
rows are merged and post-processed by ``Engine.finish``. The queue is bounded
(``OverloadedError`` → 429 at once), inputs of clients that went away are dropped before
they cost compute, and a batch that raises is split until the failing input is isolated:
only its request gets the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from sureserve.batching.planner import PassCost, oldest_batch
from sureserve.batching.truncation import Piece
from sureserve.engine import Engine, Job, Result
from sureserve.errors import InferenceError, InputTooLongError, OverloadedError
from sureserve.server.metrics import Metrics
from sureserve.settings import Settings
from sureserve.tasks.base import Task
from sureserve.tasks.embed import EmbedTask

log = logging.getLogger("sureserve.server")
INLINE_CHARS = 2048  # tokenized on the event loop up to this many characters per request


@dataclass
class _Waiting:
    piece: Piece
    future: asyncio.Future[np.ndarray]
    enqueued: float


def requested(truncate: bool | None) -> str | None:
    """A request's ``"truncate": true`` as its truncation policy; false or absent leaves the
    server's (None: the one default, resolved by ``Engine.policy``)."""
    return "truncate" if truncate else None


class Batcher:
    def __init__(self, name: str, engine: Engine, settings: Settings, metrics: Metrics,
                 tokenizer_pool: Executor, cost: PassCost | None = None, workers: int = 1,
                 packed: bool = False) -> None:
        self.name = name
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.tokenizer_pool = tokenizer_pool  # the server's (an executor)
        self.cost = cost or PassCost()
        self.packed = packed  # texts laid end to end in rows (task.forward_packed)
        self.waiting: dict[int, _Waiting] = {}  # the queue, oldest first (insertion order)
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self.workers = workers
        self._free = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix=f"forward-{name}")
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._loop:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self._running:  # batches already on a worker finish and answer their requests
            await asyncio.gather(*self._running, return_exceptions=True)
        self._pool.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self.waiting)

    async def infer(self, texts: list[str], truncation: str | None = None,
                    query: str | Sequence[str] | None = None, direction: str = "right",
                    prompt_name: str | None = None, max_text_tokens: int | None = None,
                    **options: Any) -> Result:
        """Outputs for ``texts`` in input order (``options``: see ``Engine.finish``;
        ``query``: a reranker's, paired with every text). ``truncation``: the request's
        policy (``requested``); None: the engine's (``--truncation``); ``direction``: the
        end a cut takes tokens from; ``prompt_name``: see ``Engine.prompted``."""
        job = await self._prepare(texts, truncation, query, direction=direction,
                                  prompt_name=prompt_name, max_text_tokens=max_text_tokens)
        rows = await self.queue(job.pieces)
        return self.engine.finish(job, np.vstack(rows), **options)

    async def token_states(self, texts: list[str], truncation: str | None = None,
                           direction: str = "right", prompt_name: str | None = None
                           ) -> list[np.ndarray]:
        """Every token's last hidden state per text (TEI ``/embed_all``): tokenized and cut
        like ``infer`` (the same policy), bounded by the same queue limit (429 past it),
        and run on this model's forward workers, one worker for the whole request (its
        outputs are not pooled rows, so it does not share a batch)."""
        job = await self._prepare(texts, truncation, None, chunks=False, direction=direction,
                                  prompt_name=prompt_name)
        limit = self.settings.max_queue_inputs
        if self.depth + len(job.pieces) > limit:
            self.metrics.rejected.inc()
            raise OverloadedError.queue_full(self.depth, len(job.pieces), limit,
                                             "inputs (texts or their chunks)")
        # on the forward pool (its threads are the model's forward workers: the request
        # waits its turn behind the batches already there); not through the batch loop's
        # semaphore, which its idle loop holds while it waits for work
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self.engine.token_states, job.pieces)

    async def _prepare(self, texts: list[str], truncation: str | None,
                       query: str | Sequence[str] | None,
                      chunks: bool = True, direction: str = "right",
                      prompt_name: str | None = None, max_text_tokens: int | None = None
                      ) -> Job:
        """Tokenize and apply the truncation policy (the request's, else the engine's: one
        default, resolved in ``Engine.policy``). ``chunks=False``: a route whose answer is
        one output per text refuses a text that the policy would split."""
        if not chunks and self.engine.policy(truncation) == "chunk":
            truncation = "error"
        prepare = functools.partial(self.engine.prepare, texts, truncation=truncation,
                                   query=query, direction=direction, prompt_name=prompt_name,
                                   max_text_tokens=max_text_tokens)
        try:
            # a few short texts tokenize faster than the hop to another thread costs
            # (BENCHMARKS.md); anything bigger goes to the pool, off the event loop
            job = prepare() if sum(map(len, texts)) <= INLINE_CHARS else \
                await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, prepare)
        except InputTooLongError as exc:
            fix = ('send "truncate": true to cut it (the cut is counted in metrics), or '
                   "shorten it" + (", or start the server with --truncation chunk" if chunks
                                   else " (this route answers per token: a text split into "
                                   "chunks has no single answer)"))
            raise InputTooLongError(exc.message, fix, index=exc.index, length=exc.length,
                                    limit=exc.limit) from exc
        if job.summary.truncated:
            self.metrics.truncated.inc(len(job.summary.truncated))
        return job

    async def queue(self, pieces: Sequence[Piece]) -> list[np.ndarray]:
        """Rows for ``pieces`` in order. Raises OverloadedError when the queue is full."""
        limit = self.settings.max_queue_inputs
        if self.depth + len(pieces) > limit:
            self.metrics.rejected.inc()
            raise OverloadedError.queue_full(self.depth, len(pieces), limit,
                                             "inputs (texts or their chunks)")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        ids = [next(self._ids) for _ in pieces]
        for i, p in zip(ids, pieces, strict=True):
            self.waiting[i] = _Waiting(p, loop.create_future(), now)
        futures = [self.waiting[i].future for i in ids]
        self.metrics.queue_depth.labels(self.name).set(self.depth)
        self._wake.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:  # the client went away, or a piece failed: drop the rest
            for i in ids:
                w = self.waiting.pop(i, None)
                if w and not w.future.done():
                    w.future.cancel()
            self.metrics.queue_depth.labels(self.name).set(self.depth)
            raise

    async def _run(self) -> None:
        while True:
            await self._free.acquire()
            try:
                items = await self._next_batch()
            except BaseException:
                self._free.release()
                raise
            runner = asyncio.create_task(self._execute(items))
            self._running.add(runner)
            runner.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Waiting]:
        """Wait for work (and, briefly, for company), then take one batch off the queue."""
        while True:
            await self._wake.wait()
            await self._wait_for_company()
            s = self.settings
            batch = oldest_batch([(i, w.piece.weight) for i, w in self.waiting.items()],
                                 s.max_batch_tokens, s.max_batch_size, self.cost, self.packed,
                                 s.planner_window)
            if batch is None:
                self._wake.clear()
                continue
            items = [self.waiting.pop(i) for i in batch.ids]
            live = [w for w in items if not w.future.done()]
            if live:
                return live

    async def _execute(self, items: list[_Waiting]) -> None:
        """Run one batch on a free worker and answer its requests (frees the worker)."""
        try:
            start = time.perf_counter()
            for w in items:
                self.metrics.queue_seconds.observe(start - w.enqueued)
            try:
                outs, computed = await asyncio.get_running_loop().run_in_executor(
                    self._pool, functools.partial(self.engine.forward_isolating,
                                                  [w.piece for w in items],
                                                  packed=self.packed))
            except Exception as exc:  # a failure outside any one input's forward
                log.exception("a batch failed")
                for w in items:  # its requests get the error; none is left waiting
                    if not w.future.done():
                        w.future.set_exception(InferenceError(
                            f"the batch holding this input failed: {exc}",
                            "retry the request; other requests were not affected"))
                return
            self._observe(items, time.perf_counter() - start, computed)
            for w, out in zip(items, outs, strict=True):
                if w.future.done():
                    continue
                if isinstance(out, Exception):
                    w.future.set_exception(out)
                else:
                    w.future.set_result(out)
            self.metrics.queue_depth.labels(self.name).set(self.depth)
        finally:
            self._free.release()

    async def _wait_for_company(self) -> None:
        """Hold a lone request up to max_wait_ms so that others can share its batch."""
        wait = self.settings.max_wait_ms / 1000
        if wait <= 0 or not self.waiting:
            return
        oldest = min(w.enqueued for w in self.waiting.values())
        cost = max(w.piece.weight for w in self.waiting.values()) * len(self.waiting)
        remaining = oldest + wait - time.perf_counter()
        if remaining > 0 and cost < self.settings.max_batch_tokens:
            await asyncio.sleep(remaining)

    def _observe(self, items: list[_Waiting], seconds: float, computed: int) -> None:
        """``computed``: tokens the passes computed, padding included, as ``_forward``
        counted them (so a packed layout is not built twice, nor on the event loop)."""
        m = self.metrics
        m.inference_seconds.observe(seconds)
        m.batch_size.observe(len(items))
        m.batch_tokens.observe(computed)
        m.padding_share.observe(1 - sum(w.piece.weight for w in items) / computed)

    @classmethod
    def warmed_up(cls, name: str, engine: Engine, settings: Settings, metrics: Metrics,
                  tokenizer_pool: Executor, workers: int) -> Batcher:
        """A batcher for a loaded model, after measuring its pass cost (which is also its
        warm-up) and deciding whether to pack its batches. Runs off the event loop."""
        cost, how = cached_cost(engine, settings)
        log.info("%s: a forward pass costs %.0f tokens' worth plus its tokens "
                 "(attention: %.4f more per token of length; %s)", name, cost.overhead,
                 cost.attention, how)
        return cls(name, engine, settings, metrics, tokenizer_pool, cost, workers,
                   _may_pack(name, engine, settings))


def cost_key(engine: Engine) -> str:
    """What a pass's cost depends on besides the machine (which the cache file's name
    holds: CPU model, torch version, thread count): the architecture (config), the task,
    the load plan, the quantization recipe, the length limit and which linear layers run
    packed (and with a fused GELU). Not the weights' values: two fine-tunes of one
    architecture cost the same."""
    loaded = engine.loaded
    recipe = loaded.quantization.summary() if loaded.quantization else None
    packing = [(s.shape, s.dtype, s.min_rows, s.packed) for s in engine.packing.shapes]
    plan = loaded.plan
    what = {"config": {k: v for k, v in loaded.config.items() if not k.startswith("_")},
            "task": type(engine.text_task()).__name__,
            "plan": [plan.device, plan.dtype, plan.attn_implementation],
            "quantization": recipe, "max_len": loaded.limit.value, "packing": packing,
            "fused_gelu": engine.packing.fused_gelu}
    blob = json.dumps(what, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cached_cost(engine: Engine, settings: Settings) -> tuple[PassCost, str]:
    """``measure_cost``, cached per machine and architecture on a CPU (under
    ``SURESERVE_HOME/machine/``, like the decode paths' timings): it took ~1.4 s of each
    encoder's start here, paid again by every server, replica and restart of the same model
    on the same machine; the figures only steer how batches are split, never an answer.
    The gate's probes have run the model by then, so no warm-up is lost. On a GPU it is
    measured at every start (the cache is keyed by the CPU)."""
    from sureserve.loading.machine import measured_once

    fresh: list[PassCost] = []

    def measure() -> list[float]:
        fresh.append(measure_cost(engine.text_task(), engine.loaded.limit.value))
        return [fresh[-1].overhead, fresh[-1].attention]

    if engine.loaded.plan.device != "cpu":
        measure()
        return fresh[0], "measured"
    overhead, attention = measured_once(settings.home_dir(), "passcost", cost_key(engine),
                                        measure, lambda v: (float(v[0]), float(v[1])))
    return PassCost(overhead, attention), ("measured" if fresh else
                                           "as measured before on this machine")


def measure_cost(task: Task, max_len: int) -> PassCost:
    """Time a few batch shapes on the loaded model and fit the planner's cost model.

    The split between a pass's fixed cost and its per-token cost differs by orders of
    magnitude between a laptop CPU and a GPU, and it decides whether a long text should
    run alone, so it is measured on the model at warm-up rather than assumed."""
    ids = task.preprocess(["calibration"])[0]
    filler = ids[1] if len(ids) > 2 else ids[0]
    samples = []
    for n, length in ((1, 16), (8, 32), (32, 32), (1, 128), (4, 128), (1, 256)):
        length = min(length, max_len)
        body = [filler] * max(length - 2, 0)
        pieces = [Piece(0, ids[:1] + body + ids[-1:]) for _ in range(n)]
        best = float("inf")
        for _ in range(2):  # best of two: the first pass of a new shape pays setup
            start = time.perf_counter()
            task.forward(pieces)
            best = min(best, time.perf_counter() - start)
        samples.append((n, length, best))
    return PassCost.fit(samples)


def _may_pack(name: str, engine: Engine, settings: Settings) -> bool:
    """Whether to pack this model's batches: asked for, possible, and checked here on the
    gate's probe texts (packed vs one at a time) within the batch-invariance tolerance, so
    that packing can never change an answer beyond float rounding."""
    from sureserve.gate.probe_texts import DIVERSE, LONG
    from sureserve.gate.probes import tolerance

    task = engine.task
    why: str | None
    if not settings.packing:
        why = "turned off (SURESERVE_PACKING)"
    elif not isinstance(task, EmbedTask):
        why = "only embedding models are packed"
    else:
        why = task.packing_unsupported()
    if why is None and isinstance(task, EmbedTask):
        probe = task.to_pieces([*DIVERSE, LONG], "truncate").pieces
        diff = task.check_packing(probe)
        tol = tolerance(engine.loaded.precision)
        if diff <= tol:
            log.info("%s: packed batches on (largest difference to padded %.1e)", name, diff)
            return True
        why = f"packed outputs differ from padded ones by {diff:.1e} (tolerance {tol:g})"
    log.info("%s: packed batches off: %s", name, why)
    return False
