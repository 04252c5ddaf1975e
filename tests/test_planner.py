from hypothesis import given, settings
from hypothesis import strategies as st

from sureserve.batching.planner import BatchPlanner, cut, plan_batches

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


def test_state_machine_add_plan_update_cancel() -> None:
    p = BatchPlanner(max_tokens=100, max_size=4)
    for i, n in enumerate([10, 20, 30, 40, 50]):
        p.add(i, n)
    p.cancel([1])
    b = p.plan()
    assert b is not None and set(b.ids) == {4, 3}  # 50 x 2 = 100 fits the budget, x 3 not
    p.update(b.ids)
    rest = []
    while (nb := p.plan()) is not None:
        rest.extend(nb.ids)
        p.update(nb.ids)
    assert sorted(rest + list(b.ids)) == [0, 2, 3, 4]
    assert p.num_waiting == 0 and not p.running
