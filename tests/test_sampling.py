"""Sampling parameters and the per-row token choice (no model: logits made by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from sureserve.errors import InputError
from sureserve.generation.sampling import (
    RowState,
    SamplingParams,
    choose,
    new_generator,
    scores,
)


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", 0), ("max_new_tokens", 1.5), ("temperature", -0.1),
    ("temperature", 2.5), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.1),
    ("top_k", -1), ("repetition_penalty", 0.0), ("stop", ("",)),
    ("stop", ("a", "b", "c", "d", "e")), ("seed", -1), ("seed", True),
    ("frequency_penalty", 2.5), ("presence_penalty", -3), ("presence_penalty", math.inf),
    ("logit_bias", {"a": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {-1: 1}),
    ("logit_bias", {True: 1}), ("logit_bias", {"1.5": 1}), ("logit_bias", {"7": math.nan})])
def test_invalid_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InputError) as exc:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert field in exc.value.message


def test_single_stop_string_is_accepted_as_a_tuple() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)  # type: ignore[arg-type]


def _row(**kw: object) -> RowState:
    p = SamplingParams(**kw)  # type: ignore[arg-type]
    return RowState(p, [], new_generator(p, "cpu"))


def test_greedy_rows_take_the_argmax_and_sampling_rows_sample() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert choose(logits, [_row(), _row()]) == [1, 0]
    # top_k=1 keeps only the best token whatever the temperature
    assert choose(logits, [_row(temperature=2.0, top_k=1, seed=1)] * 2) == [1, 0]
    # a tiny top_p keeps only the best token too
    assert choose(logits, [_row(temperature=2.0, top_p=0.01, seed=1)] * 2) == [1, 0]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    a = [choose(logits, [row])[0] for row in [_row(temperature=1.0, seed=7)] for _ in range(400)]
    b = [choose(logits, [row])[0] for row in [_row(temperature=1.0, seed=7)] for _ in range(400)]
    assert a == b
    freq = [a.count(k) / len(a) for k in range(3)]
    assert freq == pytest.approx([0.5, 0.3, 0.2], abs=0.08)


def test_top_p_drops_the_tail() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    row = _row(temperature=1.0, top_p=0.8, seed=0)
    picks = {choose(logits, [row])[0] for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 reach 0.8: tokens 2 and 3 are never drawn


def test_repetition_penalty_discourages_seen_tokens() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    p = SamplingParams(repetition_penalty=1.5)
    assert choose(logits, [RowState(p, [0])]) == [1]  # 2.0/1.5 < 1.9
    assert choose(logits, [RowState(SamplingParams(), [0])]) == [0]


def test_logit_bias_keys_may_be_strings_and_are_stored_sorted() -> None:
    p = SamplingParams(logit_bias={"7": 2.5, 5: -100})
    assert p.bias == ((5, -100.0), (7, 2.5)) and not p.plain_greedy


def test_openai_penalties_follow_openais_definition() -> None:
    """mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, after logit_bias,
    over the output's token counts only (the prompt does not count)."""
    torch.manual_seed(0)
    logits = torch.randn(10)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.3, logit_bias={2: 5.0})
    row = RowState(p, [])
    for t in (1, 1, 4, 1):
        row.observe(t)
    want = logits.clone()
    want[2] += 5.0
    want[1] -= 3 * 0.5 + 0.3
    want[4] -= 1 * 0.5 + 0.3
    torch.testing.assert_close(scores(logits, row), want, rtol=0, atol=0)
    assert row.seen == []  # no repetition penalty: nothing kept for it


def test_penalties_change_the_greedy_pick_and_bias_can_force_or_ban() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    row = RowState(SamplingParams(presence_penalty=0.2), [])
    assert choose(logits, [row]) == [0]
    row.observe(0)
    assert choose(logits, [row]) == [1]  # 2.0 - 0.2 < 1.9
    negative = RowState(SamplingParams(frequency_penalty=-2.0), [])
    negative.observe(2)
    negative.observe(2)
    assert choose(logits, [negative]) == [2]  # -1.0 + 4.0: encouraged
    forced = SamplingParams(logit_bias={2: 100}, temperature=0.7, seed=1)
    assert choose(logits, [RowState(forced, [], new_generator(forced, "cpu"))]) == [2]
    banned = SamplingParams(logit_bias={"0": -100})
    assert choose(logits, [RowState(banned, [])]) == [1]
    # rows with and without in one batch: the plain greedy row keeps the batched argmax
    assert choose(torch.cat([logits, logits]), [RowState(banned, []),
                                                RowState(SamplingParams(), [])]) == [1, 0]


class _Allow:
    """A matcher stand-in that allows a fixed set of token ids."""

    def __init__(self, ids: list[int], vocab: int) -> None:
        import numpy as np

        bits = np.zeros(((vocab + 31) // 32) * 32, dtype=bool)
        bits[ids] = True
        self.mask = np.packbits(bits, bitorder="little").tobytes()

    def compute_bitmask(self) -> bytes:
        return self.mask


def test_grammar_rows_choose_the_best_allowed_token_batched_or_not() -> None:
    """Greedy rows whose only constraint is a grammar are masked together; rows that also
    carry a penalty go through ``scores`` one by one: both pick the best allowed token."""
    import torch

    from sureserve.generation.sampling import RowState, SamplingParams, choose

    torch.manual_seed(0)
    vocab = 70
    logits = torch.randn(4, vocab)
    allowed = [[3, 9, 41], [0, 69], [5], [7, 8, 60]]
    grammar = SamplingParams(grammar="x")
    penalised = SamplingParams(grammar="x", presence_penalty=0.5)
    rows = [RowState(grammar, [], matcher=_Allow(allowed[0], vocab)),
            RowState(grammar, [], matcher=_Allow(allowed[1], vocab)),
            RowState(SamplingParams(), []),  # no grammar: plain argmax
            RowState(penalised, [], matcher=_Allow(allowed[3], vocab))]
    assert rows[0].params.grammar_greedy and not rows[3].params.grammar_greedy
    picks = choose(logits, rows)
    for k in (0, 1, 3):
        best = max(allowed[k], key=lambda t: float(logits[k, t]))
        assert picks[k] == best
    assert picks[2] == int(logits[2].argmax())
