from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sureserve.batching.planner import PassCost, cut, oldest_batch, partition, plan_batches

lengths_st = st.lists(st.integers(min_value=1, max_value=600), max_size=300)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, budget=st.integers(1, 5000), size=st.integers(1, 64),
       window=st.integers(1, 100), min_tokens=st.integers(0, 3000),
       max_padding=st.floats(0, 1))
def test_every_item_once_budget_respected(lengths: list[int], budget: int, size: int,
                                          window: int, min_tokens: int,
                                          max_padding: float) -> None:
    batches = plan_batches(lengths, budget, size, window, min_tokens, max_padding)
    seen = [i for b in batches for i in b.ids]
    assert sorted(seen) == list(range(len(lengths)))  # each text in exactly one batch
    for b in batches:
        assert len(b.ids) <= size
        assert b.max_len == max(lengths[i] for i in b.ids)
        assert b.real_tokens == sum(lengths[i] for i in b.ids)
        # over budget only when a single text is longer than the budget by itself
        assert b.cost <= budget or len(b.ids) == 1


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, window=st.integers(1, 50))
def test_windows_never_mix(lengths: list[int], window: int) -> None:
    for b in plan_batches(lengths, 10_000, 1000, window):
        assert len({i // window for i in b.ids}) == 1


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st)
def test_order_restored_by_ids(lengths: list[int]) -> None:
    # The caller writes each batch's outputs at its ids: the result is in input order.
    out: list[int | None] = [None] * len(lengths)
    for b in plan_batches(lengths, 2048, 32, 64):
        for i in b.ids:
            out[i] = lengths[i]
    assert out == lengths


def test_sorting_cuts_padding_compared_with_arrival_order() -> None:
    lengths = [5, 300, 6, 290, 7, 280, 8, 270] * 20
    batches = plan_batches(lengths, 100_000, 8, len(lengths))
    padded = sum(b.cost for b in batches)
    arrival = sum(max(lengths[i:i + 8]) * len(lengths[i:i + 8]) for i in range(0, len(lengths), 8))
    assert padded < 0.6 * arrival


def test_padding_guard_splits_batches_that_reached_min_tokens() -> None:
    lengths = [100] * 10 + [50] * 10
    one = cut(enumerate(lengths), max_tokens=100_000, max_size=100)
    assert len(one) == 1
    two = cut(enumerate(lengths), max_tokens=100_000, max_size=100, min_tokens=500,
              max_padding=0.01)
    assert [b.max_len for b in two] == [100, 50]
    assert all(b.cost == b.real_tokens for b in two)


def test_longest_batch_first() -> None:
    batches = plan_batches([3, 50, 4, 60], 64, 2, 10)
    assert batches[0].max_len == 60


def _total(batches: list, cost: PassCost) -> float:
    return sum(cost(len(b.ids), b.max_len) for b in batches)


costs_st = st.builds(PassCost, overhead=st.floats(0, 500), attention=st.floats(0, 0.05))


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, budget=st.integers(1, 5000), size=st.integers(1, 64),
       cost=costs_st)
def test_partition_invariants_and_never_worse_than_greedy(lengths: list[int], budget: int,
                                                          size: int, cost: PassCost) -> None:
    batches = partition(enumerate(lengths), budget, size, cost)
    assert sorted(i for b in batches for i in b.ids) == list(range(len(lengths)))
    for b in batches:
        assert len(b.ids) <= size
        assert b.max_len == max(max(lengths[i] for i in b.ids), 1)
        assert b.real_tokens == sum(lengths[i] for i in b.ids)
        assert b.cost <= budget or len(b.ids) == 1
    # the greedy cut obeys the same limits, so the optimum can only be cheaper
    greedy = cut(enumerate(lengths), budget, size)
    assert _total(batches, cost) <= _total(greedy, cost) + 1e-6


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=7), cost=costs_st)
def test_partition_is_optimal_against_every_split(lengths: list[int], cost: PassCost) -> None:
    # brute force over all set partitions of up to 7 items (877 of them)
    def splits(items: list[int]) -> Iterator[list[list[int]]]:
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for sub in splits(rest):
            for k in range(len(sub)):
                yield [*sub[:k], [first, *sub[k]], *sub[k + 1:]]
            yield [[first], *sub]

    best = min(sum(cost(len(g), max(lengths[i] for i in g)) for g in split)
               for split in splits(list(range(len(lengths)))))
    got = _total(partition(enumerate(lengths), 10**9, 10**9, cost), cost)
    assert got == pytest.approx(best)


def test_partition_runs_a_long_text_alone_rather_than_pad_snippets_to_it() -> None:
    lengths = [256] + [20] * 15
    greedy = cut(enumerate(lengths), 4096, 128)
    assert len(greedy) == 1  # one pass computing 4,096 tokens for 556 real ones
    best = partition(enumerate(lengths), 4096, 128, PassCost(overhead=130, attention=1 / 300))
    assert [len(b.ids) for b in best] == [1, 15]
    # with a fixed cost per pass that dwarfs the padding (a GPU), one pass is cheaper
    gpu = partition(enumerate(lengths), 4096, 128, PassCost(overhead=5000, attention=0))
    assert len(gpu) == 1


def test_pass_cost_fit_recovers_the_model() -> None:
    true = PassCost(overhead=120, attention=0.004)
    per_token = 1e-4
    shapes = [(1, 16), (8, 32), (32, 32), (1, 128), (4, 128), (1, 256)]
    fitted = PassCost.fit([(n, ln, true(n, ln) * per_token) for n, ln in shapes])
    assert fitted.overhead == pytest.approx(120, rel=1e-6)
    assert fitted.attention == pytest.approx(0.004, rel=1e-6)
    assert PassCost.fit([(1, 1, 0.1), (2, 2, 0.05), (4, 4, 0.01)]) == PassCost()  # nonsense


def test_planner_serves_the_oldest_texts_batch_first() -> None:
    queue = [(0, 20), (1, 256)] + [(i, n) for i, n in enumerate([18, 22, 25, 19], start=2)]
    b = oldest_batch(queue, max_tokens=4096, max_size=128, cost=PassCost())
    assert b is not None and set(b.ids) == {0, 2, 3, 4, 5}  # the snippets, not the article
    rest = [it for it in queue if it[0] not in b.ids]
    b2 = oldest_batch(rest, max_tokens=4096, max_size=128, cost=PassCost())
    assert b2 is not None and b2.ids == (1,)


def test_queue_drains_oldest_first_within_budget_and_window() -> None:
    queue = list(enumerate([10, 20, 30, 40, 50]))
    order = []
    while (b := oldest_batch(queue, max_tokens=100, max_size=4, cost=PassCost(),
                             window=3)) is not None:
        assert b.cost <= 100 and all(i in dict(queue) for i in b.ids)
        assert queue[0][0] in b.ids  # the oldest waiting item is always served
        assert all(i in dict(queue[:3]) for i in b.ids)  # nothing past the window
        order.append(b.ids)
        queue = [it for it in queue if it[0] not in b.ids]
    assert sorted(i for ids in order for i in ids) == [0, 1, 2, 3, 4]
    assert oldest_batch([], 100, 4, PassCost()) is None
