"""Which waiting prompts share a prefill forward (``GenerationEngine._group``), without a
model: the oldest, then those closest to it in length, within the padded token budget."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sureserve.generation.continuous import GenerationEngine


def _engine(lengths: list[int], chunked: int | None = None) -> GenerationEngine:
    gen = GenerationEngine.__new__(GenerationEngine)  # only the prefill queue is used
    gen._prefilling = [SimpleNamespace(prompt=list(range(n)), computed=0, done=None,
                                       chain=-9 if k == chunked else 0, id=k)
                       for k, n in enumerate(lengths)]  # type: ignore[misc]
    return gen


def test_the_oldest_prompt_takes_the_closest_lengths_first() -> None:
    gen = _engine([60, 10, 58, 12, 61, 30])
    group = gen._group(gen._prefilling[0], 200)  # type: ignore[arg-type]
    assert [len(s.prompt) for s in group] == [60, 61, 58]  # 3 x 61 = 183 <= 200
    # FIFO order had padded 60, 10, 58 to 3 x 60 with 48 of the 10-token row's wasted


def test_shorter_prompts_fill_what_is_left_of_the_budget() -> None:
    gen = _engine([10, 12, 11, 50, 9])
    group = gen._group(gen._prefilling[0], 48)  # type: ignore[arg-type]
    assert [len(s.prompt) for s in group] == [10, 11, 9, 12]  # 4 x 12 = 48; 50 never fits


def test_finished_and_chunked_prompts_are_left_out() -> None:
    gen = _engine([20, 20, 20, 20], chunked=2)
    gen._prefilling[1].done = object()  # cancelled while waiting
    group = gen._group(gen._prefilling[0], 512)  # type: ignore[arg-type]
    assert [s.id for s in group] == [0, 3]


def _stepping(lengths: list[int], decoding: bool) -> tuple[GenerationEngine, list[list[int]]]:
    """An engine whose forwards only record which prompts (by length) they took."""
    gen = _engine(lengths)
    gen.prefix, gen.prefill_tokens, gen.prefill_group_tokens = None, 512, 128
    gen._rows = [object()] if decoding else []  # type: ignore[list-item]
    forwards: list[list[int]] = []

    def forward(group: list[SimpleNamespace], budget: int) -> int:
        forwards.append([len(s.prompt) for s in group])
        for s in group:
            s.computed = len(s.prompt)
        return len(group) * max(len(s.prompt) for s in group)

    gen._prefill_group = forward  # type: ignore[assignment,method-assign]
    gen._deliver = lambda done: None  # type: ignore[method-assign]
    return gen, forwards


def test_a_burst_is_prefilled_in_groups_of_the_group_budget() -> None:
    """32 prompts of 30 tokens: groups of 4 (120 <= 128 padded tokens), one after the other
    up to the step's 512 tokens when nothing is decoding; a 200-token prompt still runs
    whole (the group budget limits who joins, never truncates)."""
    gen, forwards = _stepping([30] * 32, decoding=False)
    gen._prefill_some()
    # 4 x 120 = 480 tokens, then what fits in the last 32: one more prompt
    assert forwards == [[30] * 4] * 4 + [[30]] and len(gen._prefilling) == 15
    gen, forwards = _stepping([200, 30], decoding=False)
    gen._prefill_some()
    assert forwards == [[200], [30]]


def test_while_rows_decode_no_forward_starts_past_one_group_of_tokens() -> None:
    gen, forwards = _stepping([30] * 32, decoding=True)
    gen._prefill_some()
    assert forwards == [[30] * 4] * 2  # 120 < 128 after one: a second starts, not a third
    gen, forwards = _stepping([300, 30, 30], decoding=True)
    gen._prefill_some()
    assert forwards == [[300]]  # a whole prompt of 300 (never cut to the group budget)
    gen, forwards = _stepping([30] * 32, decoding=False)
    gen.prefill_group_tokens = 512  # one group of the whole budget, as before the setting
    gen._prefill_some()
    assert forwards == [[30] * 17]


def test_the_setting_reaches_the_engine(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """``prefill_group_tokens`` as a keyword and as its environment variable (what
    ``serve --prefill-group-tokens`` sets) ends up in the generation engine."""
    import sureserve
    from sureserve.errors import SettingsError
    from sureserve.settings import Settings

    engine = sureserve.load(str(tiny_llama), accept_gate_failure=True, drift_watch=False,
                            prefill_group_tokens=64)
    assert engine.generation is not None and engine.generation.prefill_group_tokens == 64
    monkeypatch.setenv("SURESERVE_PREFILL_GROUP_TOKENS", "32")
    assert Settings().prefill_group_tokens == 32
    with pytest.raises(SettingsError, match="prefill_group_tokens: Input should be greater"):
        Settings(prefill_group_tokens=0)


def test_first_events_split_the_wait_into_queue_and_prefill(tiny_llama: Path) -> None:
    """A request's first event says how long it waited before its prompt's first forward
    (``queued_s``, what /metrics' sureserve_generation_queue_seconds shows); the rest of
    its time to first token is the prefill. While a row decodes, a burst is prefilled one
    group per step, so the burst's later prompts wait longer."""
    import time

    import sureserve
    from sureserve.generation.sampling import SamplingParams

    engine = sureserve.load(str(tiny_llama), accept_gate_failure=True, drift_watch=False,
                            prefill_group_tokens=12, prefix_cache_mb=0)
    gen = engine.generation
    assert gen is not None
    events: dict[int, list[Any]] = {}

    def on_event(ev: Any) -> None:
        events.setdefault(ev.seq_id, []).append(ev)

    [first] = gen.submit([list(range(5, 15))], SamplingParams(max_new_tokens=30), on_event)
    gen.step()  # prefilled, now decoding
    burst = gen.submit([list(range(20 + k, 32 + k)) for k in range(3)],
                       SamplingParams(max_new_tokens=2), on_event)
    time.sleep(0.05)  # waiting in the queue
    steps = 0
    while any(len(events.get(i, [])) == 0 for i in burst):
        gen.step()
        steps += 1
    assert steps == 3  # 12-token prompts, 12-token groups: one per step while decoding
    queued = []
    for i in [first, *burst]:
        head, *rest = events[i]
        assert head.first and head.queued_s is not None
        assert 0.0 <= head.queued_s <= head.wait_s  # the rest of the wait is the prefill
        assert all(ev.queued_s is None for ev in rest)
        queued.append(head.queued_s)
    assert min(queued[1:]) >= 0.05  # the burst waited at least the sleep
    assert queued[1] < queued[2] < queued[3]  # one 12-token group per step while decoding
