"""The server's batcher without a model: concurrency of forward workers, planning, stop,
and the queue as the one record of waiting work."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sureserve.batching.planner import PassCost
from sureserve.batching.truncation import Piece
from sureserve.engine import Engine
from sureserve.errors import InferenceError, OverloadedError
from sureserve.server.batcher import Batcher
from sureserve.server.metrics import Metrics
from sureserve.settings import Settings


class SlowTask:
    """Answers each piece with its length after a pause; records overlapping passes."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.batches: list[list[int]] = []

    def forward(self, pieces: list[Piece]) -> np.ndarray:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.batches.append([len(p.ids) for p in pieces])
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1
        return np.array([[float(len(p.ids))] for p in pieces], dtype=np.float32)


def _pieces(*lengths: int) -> list[list[Piece]]:
    return [[Piece(0, [1] * n)] for n in lengths]


def _batcher(task: SlowTask, settings: Settings, workers: int = 1,
             cost: PassCost | None = None) -> Batcher:
    # the engine's own forward path (Engine.forward / forward_isolating) over a fake task
    engine: Any = SimpleNamespace(text_task=lambda: task, settings=settings)
    engine.forward = functools.partial(Engine.forward, engine)
    engine.forward_isolating = functools.partial(Engine.forward_isolating, engine)
    return Batcher("m", engine, settings, Metrics(), ThreadPoolExecutor(1), cost, workers)


async def _serve(task: SlowTask, workers: int, lengths: tuple[int, ...]) -> list[Any]:
    b = _batcher(task, Settings(max_wait_ms=50), workers, PassCost(overhead=100, attention=0))
    b.start()
    try:
        return await asyncio.gather(*(b.queue(p) for p in _pieces(*lengths)))
    finally:
        await b.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_run_batches_at_once(workers: int) -> None:
    task = SlowTask()
    # an article and snippets: the cost model splits them into two batches
    out = asyncio.run(_serve(task, workers, (400, 10, 12, 11)))
    assert [float(r[0][0]) for r in out] == [400, 10, 12, 11]  # each caller gets its own row
    assert sorted(map(sorted, task.batches)) == [[10, 11, 12], [400]]
    assert task.most == workers


def test_stop_lets_running_batches_answer() -> None:
    async def main() -> list[Any]:
        task = SlowTask(0.3)
        b = _batcher(task, Settings(max_wait_ms=0), workers=2)
        b.start()
        pending = asyncio.gather(*(b.queue(p) for p in _pieces(5, 500)))
        await asyncio.sleep(0.1)  # both batches are on a worker now
        await b.stop()
        return await asyncio.wait_for(pending, 1)

    out = asyncio.run(main())
    assert [float(r[0][0]) for r in out] == [5, 500]


def test_queue_is_bounded_and_a_cancelled_request_leaves_nothing_behind() -> None:
    async def main() -> None:
        task = SlowTask(0.3)
        b = _batcher(task, Settings(max_wait_ms=0, max_queue_inputs=3))
        b.start()
        first = asyncio.ensure_future(b.queue(_pieces(7)[0]))
        await asyncio.sleep(0.1)  # 7 is on the worker now; the queue is empty again
        waiting = asyncio.ensure_future(b.queue([Piece(0, [1] * 3), Piece(1, [1] * 4)]))
        await asyncio.sleep(0)
        assert b.depth == 2
        with pytest.raises(OverloadedError, match="SURESERVE_MAX_QUEUE_INPUTS"):
            await b.queue(_pieces(1, 2)[0] + _pieces(3)[0])  # 2 + 2 > 3
        waiting.cancel()  # the client went away before its pieces ran
        await asyncio.gather(waiting, return_exceptions=True)
        assert b.depth == 0
        assert float((await first)[0][0]) == 7
        await b.stop()
        assert [4] not in task.batches and [3] not in task.batches  # never computed

    asyncio.run(main())


def test_forward_workers_one_rule_for_every_path() -> None:
    """The setting wins; otherwise two passes on a CPU with 2+ torch threads (what this
    machine has decides, as in production), one on a GPU or beside a generation model."""
    import torch

    from sureserve.engine import forward_workers

    assert forward_workers(3, cpu=False, generating=True) == 3
    assert forward_workers(None, cpu=False) == 1
    assert forward_workers(None, cpu=True, generating=True) == 1
    assert forward_workers(None, cpu=True) == (2 if torch.get_num_threads() >= 2 else 1)


def test_a_batch_that_fails_outside_the_model_answers_its_requests() -> None:
    """Whatever goes wrong in a batch (here the engine itself raises, not one input),
    its requests get an error that says so instead of waiting forever, and the batcher
    keeps serving the next ones."""
    async def main() -> tuple[BaseException | None, Any]:
        task = SlowTask(0.01)
        b = _batcher(task, Settings(max_wait_ms=0))
        real = b.engine.forward_isolating
        b.engine.forward_isolating = lambda *a, **k: 1 / 0  # not an input's fault
        b.start()
        try:
            try:
                await asyncio.wait_for(b.queue(_pieces(5)[0]), 5)
                failed = None
            except InferenceError as exc:
                failed = exc
            b.engine.forward_isolating = real
            return failed, await asyncio.wait_for(b.queue(_pieces(6)[0]), 5)
        finally:
            await b.stop()

    failed, after = asyncio.run(main())
    assert failed is not None and "batch holding this input failed" in str(failed.message)
    assert float(after[0][0]) == 6


def test_the_pass_cost_is_measured_once_per_machine_and_architecture(
        tiny_bert: Any, home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second start of the same architecture on this machine reads the cost it measured
    (each encoder's start paid ~1.4 s for it); another precision is measured anew."""
    import sureserve
    from sureserve.server import batcher as B

    calls: list[int] = []
    real = B.measure_cost

    def counted(task: Any, max_len: int) -> PassCost:
        calls.append(max_len)
        return real(task, max_len)

    monkeypatch.setattr(B, "measure_cost", counted)
    engine = sureserve.load(str(tiny_bert), accept_gate_failure=True, drift_watch=False)
    settings = Settings()
    first, how = B.cached_cost(engine, settings)
    assert how == "measured" and len(calls) == 1
    again, how = B.cached_cost(engine, settings)
    assert (again, how) == (first, "as measured before on this machine") and len(calls) == 1
    assert list((home / "machine").glob("passcost-*.json"))
    bf16 = sureserve.load(str(tiny_bert), dtype="bfloat16", accept_gate_failure=True,
                          drift_watch=False)
    assert B.cost_key(bf16) != B.cost_key(engine)
    assert B.cached_cost(bf16, settings)[1] == "measured" and len(calls) == 2
