from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sureserve.errors import InputTooLongError
from sureserve.generation.scheduler import GenerationScheduler


@dataclass
class Req:
    """The smallest record the scheduler takes: an id and a KV reservation."""

    id: int
    prompt_len: int
    max_new_tokens: int

    @property
    def reservation(self) -> int:
        return self.prompt_len + self.max_new_tokens


def _add(s: GenerationScheduler[Req], rid: int, prompt: int, new: int) -> None:
    s.check(prompt, new, rid)
    s.add(Req(rid, prompt, new))


def test_requests_that_can_never_fit_are_refused_with_numbers() -> None:
    s = GenerationScheduler(kv_budget_tokens=1000, context_limit=512)
    with pytest.raises(InputTooLongError) as exc:
        _add(s, 1, 500, 20)
    assert "520" in exc.value.message and "512" in exc.value.message
    big = GenerationScheduler(kv_budget_tokens=300, context_limit=8192)
    with pytest.raises(InputTooLongError) as exc:
        _add(big, 1, 200, 200)
    assert "400" in exc.value.message and "300" in exc.value.message


def test_admission_waits_for_budget_and_frees_on_finish() -> None:
    s = GenerationScheduler(kv_budget_tokens=100, context_limit=1000)
    _add(s, 1, 30, 30)
    _add(s, 2, 30, 30)
    p = s.plan()
    assert p.prefill == (1,) and p.decode == ()
    p = s.plan()
    assert p.prefill == () and p.decode == (1,)  # 2 waits: 60 + 60 > 100
    s.update([1])
    p = s.plan()
    assert p.prefill == (2,)


def test_fifo_no_overtaking() -> None:
    s = GenerationScheduler(kv_budget_tokens=100, context_limit=1000)
    _add(s, 1, 50, 10)
    s.plan()
    _add(s, 2, 50, 10)  # does not fit next to 1
    _add(s, 3, 5, 5)  # would fit, but must not overtake 2
    assert s.plan().prefill == ()


@settings(max_examples=100, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40)), min_size=1,
                     max_size=30),
       budget=st.integers(100, 400), max_running=st.integers(1, 8))
def test_budget_never_exceeded_and_everything_finishes(reqs: list[tuple[int, int]], budget: int,
                                                       max_running: int) -> None:
    s = GenerationScheduler(kv_budget_tokens=budget, context_limit=10_000,
                            max_running=max_running)
    for i, (p, n) in enumerate(reqs):
        _add(s, i, p, n)
    done: set[int] = set()
    generated: dict[int, int] = {}
    for _ in range(10_000):
        if not s.waiting and not s.running:
            break
        plan = s.plan()
        assert s.reserved <= budget and len(s.running) <= max_running
        stepped = list(plan.prefill) + list(plan.decode)
        for i in stepped:
            generated[i] = generated.get(i, 0) + 1
        finished = [i for i in stepped if generated[i] >= s.running[i].max_new_tokens]
        s.update(finished)
        done.update(finished)
    assert done == set(range(len(reqs)))


def test_reservation_counts_the_padded_rectangle_by_default() -> None:
    # the engine's cache is rows x longest row: a short request next to a long one costs
    # as much as the long one (2 x 120 = 240 > 230, though 120 + 10 = 130 would fit)
    rect = GenerationScheduler(kv_budget_tokens=230, context_limit=1000)
    summed = GenerationScheduler(kv_budget_tokens=230, context_limit=1000, rectangular=False)
    for s in (rect, summed):
        _add(s, 1, 100, 20)
        _add(s, 2, 5, 5)
    assert rect.plan().prefill == (1,) and rect.reserved == 120
    assert summed.plan().prefill == (1, 2) and summed.reserved == 130
    roomy = GenerationScheduler(kv_budget_tokens=240, context_limit=1000)
    _add(roomy, 1, 100, 20)
    _add(roomy, 2, 5, 5)
    assert roomy.plan().prefill == (1, 2) and roomy.reserved == 240
