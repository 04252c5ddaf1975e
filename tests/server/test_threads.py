"""Start-up work runs on threads that end (so no OpenMP pool outlives it), and the wait
policy is chosen from what is served."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sureserve.server.run import _generates
from sureserve.server.state import in_own_thread
from sureserve.settings import Settings


def test_in_own_thread_returns_raises_and_leaves_no_thread_behind() -> None:
    seen: list[threading.Thread] = []

    def work(x: int) -> int:
        seen.append(threading.current_thread())
        return x * 2

    def fail() -> None:
        raise ValueError("bad model")

    async def main() -> int:
        got = await in_own_thread(work, 21)
        with pytest.raises(ValueError, match="bad model"):
            await in_own_thread(fail)
        return got

    assert asyncio.run(main()) == 42
    (t,) = seen
    assert t is not threading.main_thread()
    t.join(timeout=5)
    assert not t.is_alive()


def test_generation_models_are_told_apart_before_torch_loads() -> None:
    s = Settings()
    assert _generates("smollm2", s) is True
    assert _generates("minilm", s) is False
    assert _generates("no/such-model-here", s) is False  # the loader reports it later
