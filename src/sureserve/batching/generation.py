"""The continuous-batching scheduler for text generation: a pure state machine.

One step is one forward pass. ``plan`` says which waiting requests are admitted (and so
prefilled) this step and which running ones decode one token; ``update`` records what the
step produced. Admission control is by KV-cache reservation: a request reserves
``prompt + max_new_tokens`` tokens of cache for its whole life, and is admitted only
while the reservations fit the budget, so the cache can never run out mid-way. The engine
keeps the running rows in one left-padded rectangular cache, so by default the reservation
is counted as the rectangle it may grow to (rows x the largest reservation), not the sum:
that is the memory really allocated at the worst moment.
A request that could never fit (longer than the context, or than the whole budget) is
refused when it is added, with the numbers. No torch, no threads, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from sureserve.errors import InputTooLongError


@dataclass
class Request:
    id: int
    prompt_len: int
    max_new_tokens: int
    generated: int = 0

    @property
    def reservation(self) -> int:
        return self.prompt_len + self.max_new_tokens


@dataclass(frozen=True)
class StepPlan:
    prefill: tuple[int, ...]  # admitted this step: run their prompts, emit their first token
    decode: tuple[int, ...]  # already running: one more token each


@dataclass
class GenerationScheduler:
    kv_budget_tokens: int
    context_limit: int
    max_running: int = 64
    rectangular: bool = True  # count rows x largest reservation (the engine's cache layout)
    waiting: OrderedDict[int, Request] = field(default_factory=OrderedDict)
    running: dict[int, Request] = field(default_factory=dict)

    @property
    def reserved(self) -> int:
        return self._cost([s.reservation for s in self.running.values()])

    def _cost(self, reservations: list[int]) -> int:
        if not reservations:
            return 0
        if self.rectangular:
            return len(reservations) * max(reservations)
        return sum(reservations)

    def add(self, seq_id: int, prompt_len: int, max_new_tokens: int) -> None:
        self.check(seq_id, prompt_len, max_new_tokens)
        if seq_id in self.waiting or seq_id in self.running:
            raise ValueError(f"sequence {seq_id} is already scheduled")
        self.waiting[seq_id] = Request(seq_id, prompt_len, max_new_tokens)

    def check(self, seq_id: int, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse, with the numbers, a request that could never be admitted."""
        need = prompt_len + max_new_tokens
        if need > self.context_limit:
            raise InputTooLongError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {need} "
                f"exceeds the model's context of {self.context_limit} tokens",
                "shorten the prompt or lower max_new_tokens",
                index=seq_id, length=need, limit=self.context_limit)
        if need > self.kv_budget_tokens:
            raise InputTooLongError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {need} "
                f"needs more KV cache than the whole budget of {self.kv_budget_tokens} tokens",
                "lower max_new_tokens, or raise the KV-cache budget: --kv-cache-mb "
                "(SURESERVE_KV_CACHE_MB)",
                index=seq_id, length=need, limit=self.kv_budget_tokens)

    def plan(self) -> StepPlan:
        """Admit waiting requests first-come first-served while their reservation fits."""
        decode = tuple(self.running)
        admitted: list[int] = []
        reservations = [s.reservation for s in self.running.values()]
        for seq_id, seq in list(self.waiting.items()):
            if len(self.running) + len(admitted) >= self.max_running:
                break
            if self._cost([*reservations, seq.reservation]) > self.kv_budget_tokens:
                break  # FIFO: a big request is not overtaken forever by small ones
            admitted.append(seq_id)
            reservations.append(seq.reservation)
        for seq_id in admitted:
            self.running[seq_id] = self.waiting.pop(seq_id)
        return StepPlan(tuple(admitted), decode)

    def update(self, produced: Iterable[int], finished: Iterable[int]) -> None:
        """``produced``: sequences that got one token this step; ``finished``: done ones
        (stop token, stop string, length, or cancelled), whose reservation is freed."""
        for seq_id in produced:
            if seq_id in self.running:
                self.running[seq_id].generated += 1
        for seq_id in finished:
            self.running.pop(seq_id, None)
            self.waiting.pop(seq_id, None)

    def cancel(self, seq_id: int) -> None:
        self.update((), (seq_id,))
