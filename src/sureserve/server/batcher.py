"""Dynamic batching for the server: requests from many clients share forward passes.

Request handlers tokenize in the event loop and ``submit`` pieces; one loop per model
plans a batch with the pure ``BatchPlanner`` whenever one of its forward workers is free
and runs ``task.forward`` (or ``forward_packed``) on that worker's thread, so the next
requests are tokenized while batches compute. The queue is bounded (``OverloadedError`` →
429 at once), inputs of clients that went away are dropped before they cost compute, and a
batch that raises is split until the failing input is isolated: only its request gets the
error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from sureserve.batching.packing import pack_rows
from sureserve.batching.planner import BatchPlanner, PassCost
from sureserve.batching.truncation import Piece
from sureserve.errors import InferenceError, OverloadedError
from sureserve.server.metrics import Metrics
from sureserve.settings import Settings

log = logging.getLogger("sureserve.server")


@dataclass
class _Waiting:
    piece: Piece
    future: asyncio.Future[np.ndarray]
    enqueued: float


class Batcher:
    def __init__(self, name: str, task: Any, settings: Settings, metrics: Metrics,
                 cost: PassCost | None = None, workers: int = 1, packed: bool = False
                 ) -> None:
        self.name = name
        self.task = task
        self.settings = settings
        self.metrics = metrics
        self.packed = packed  # texts laid end to end in rows (task.forward_packed)
        self.planner = BatchPlanner(settings.max_batch_tokens, settings.max_batch_size,
                                    settings.planner_window, cost or PassCost(), packed)
        self.waiting: dict[int, _Waiting] = {}
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self.workers = workers
        self._free = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix=f"forward-{name}")
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._running:  # batches already on a worker finish and answer their requests
            await asyncio.gather(*self._running, return_exceptions=True)
        self._pool.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self.waiting)

    async def submit(self, pieces: Sequence[Piece]) -> list[np.ndarray]:
        """Rows for ``pieces`` in order. Raises OverloadedError when the queue is full."""
        limit = self.settings.max_queue_inputs
        if self.depth + len(pieces) > limit:
            self.metrics.rejected.inc()
            raise OverloadedError.queue_full(self.depth, len(pieces), limit, "inputs")
        loop = asyncio.get_running_loop()
        ids = []
        now = time.perf_counter()
        for p in pieces:
            i = next(self._ids)
            self.waiting[i] = _Waiting(p, loop.create_future(), now)
            self.planner.add(i, p.weight)
            ids.append(i)
        futures = [self.waiting[i].future for i in ids]
        self.metrics.queue_depth.labels(self.name).set(self.depth)
        self._wake.set()
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            self._forget(ids)  # the client went away: do not compute its inputs
            raise
        except Exception:
            self._forget(ids)
            raise

    def _forget(self, ids: list[int]) -> None:
        self.planner.cancel(ids)
        for i in ids:
            w = self.waiting.pop(i, None)
            if w and not w.future.done():
                w.future.cancel()
        self.metrics.queue_depth.labels(self.name).set(self.depth)

    async def _run(self) -> None:
        while True:
            await self._free.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._free.release()
                raise
            task = asyncio.create_task(self._execute(*batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> tuple[list[int], list[_Waiting]]:
        """Wait for work (and, briefly, for company), then plan one batch of live inputs."""
        while True:
            await self._wake.wait()
            await self._wait_for_company()
            batch = self.planner.plan()
            if batch is None:
                self._wake.clear()
                continue
            self.planner.update(batch.ids)  # the planner's part ends here; we track the rest
            live = [i for i in batch.ids if i in self.waiting
                    and not self.waiting[i].future.done()]
            if not live:
                continue
            return live, [self.waiting[i] for i in live]

    async def _execute(self, live: list[int], items: list[_Waiting]) -> None:
        """Run one batch on a free worker and answer its requests (frees the worker)."""
        try:
            start = time.perf_counter()
            for w in items:
                self.metrics.queue_seconds.observe(start - w.enqueued)
            outs, computed = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._forward_isolating, [w.piece for w in items])
            self._observe(items, time.perf_counter() - start, computed)
            for i, w, out in zip(live, items, outs, strict=True):
                self.waiting.pop(i, None)
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
        m.padding_ratio.observe(1 - sum(w.piece.weight for w in items) / computed)

    @staticmethod
    def measure_cost(task: Any, max_len: int) -> PassCost:
        """Time a few batch shapes on the loaded model and fit the planner's cost model.

        Runs at warm-up (about a second on a CPU): the split between a pass's fixed cost
        and its per-token cost differs by orders of magnitude between a laptop CPU and a
        GPU, and it decides whether a long text should run alone."""
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

    def _forward_isolating(self, pieces: list[Piece]
                           ) -> tuple[list[np.ndarray | Exception], int]:
        """Forward a batch; if it raises, split it to find the inputs that fail alone.
        Returns one row (or error) per piece and the tokens computed."""
        try:
            rows, computed = self._forward(pieces)
            return [rows[k] for k in range(len(pieces))], computed
        except Exception as exc:
            if len(pieces) == 1:
                log.warning("input failed in the model: %s", exc)
                return [InferenceError(f"the model raised on this input: {exc}",
                                       "check the input; other requests were not affected")
                        ], pieces[0].weight
            mid = len(pieces) // 2
            left, left_computed = self._forward_isolating(pieces[:mid])
            right, right_computed = self._forward_isolating(pieces[mid:])
            return left + right, left_computed + right_computed

    def _forward(self, pieces: list[Piece]) -> tuple[np.ndarray, int]:
        """Rows for ``pieces`` and the tokens computed (padding or packing slack included)."""
        if not self.packed:
            return (np.asarray(self.task.forward(pieces)),
                    max(p.weight for p in pieces) * len(pieces))
        layout = pack_rows([p.weight for p in pieces])
        if layout.computed > self.settings.max_batch_tokens and len(pieces) > 1:
            # the planner counted the fewest rows; first-fit may need one more
            mid = len(pieces) // 2
            (left, left_computed), (right, right_computed) = (self._forward(pieces[:mid]),
                                                              self._forward(pieces[mid:]))
            return np.vstack([left, right]), left_computed + right_computed
        return np.asarray(self.task.forward_packed(pieces, layout)), layout.computed
