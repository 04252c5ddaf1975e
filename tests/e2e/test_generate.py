"""Continuous batching must not change greedy outputs: token for token equal to
``model.generate`` run one prompt at a time, with prompts joining at different steps."""

from __future__ import annotations

import pytest

import sureserve
from sureserve.errors import InputTooLongError
from sureserve.tasks.generate import Generator

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "1, 2, 3,", "def fib(n):", "Hi",
           "Once upon a time there was a very small dragon who",
           "The chemical symbol for gold is", "Tell me a joke"]


@pytest.fixture(scope="module")
def smollm2() -> sureserve.Engine:
    return sureserve.load("smollm2")


def test_greedy_equals_one_at_a_time(smollm2: sureserve.Engine) -> None:
    tok = smollm2.tokenizer
    n = 12
    # max_running 3 < 7 prompts: later prompts join a running batch at different steps,
    # and rows finish (eos or length) and leave while others continue
    gen = Generator(smollm2.loaded, max_running=3)
    ours = gen.generate_ids([list(tok(p)["input_ids"]) for p in PROMPTS], n)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ids = tok(prompt, return_tensors="pt")
        ref = smollm2.model.generate(**ids, max_new_tokens=n, do_sample=False)
        assert got == ref[0, ids["input_ids"].shape[1]:].tolist(), prompt


def test_budget_refuses_what_can_never_fit(smollm2: sureserve.Engine) -> None:
    gen = Generator(smollm2.loaded, kv_budget_tokens=20)
    with pytest.raises(InputTooLongError) as exc:
        gen.generate(["a prompt of a few tokens"], max_new_tokens=30)
    assert "budget of 20 tokens" in exc.value.message


def test_kv_budget_small_enough_to_queue_still_completes(smollm2: sureserve.Engine) -> None:
    # room for about one request at a time: the others wait in the queue, then run
    gen = Generator(smollm2.loaded, kv_budget_tokens=40, max_running=8)
    outs = gen.generate(PROMPTS[:3], max_new_tokens=6)
    assert len(outs) == 3 and "Paris" in outs[0]
