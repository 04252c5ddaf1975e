"""Which waiting prompts share a prefill forward (``GenerationEngine._group``), without a
model: the oldest, then those closest to it in length, within the padded token budget."""

from __future__ import annotations

from types import SimpleNamespace

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
