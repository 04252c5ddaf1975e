"""The continuous-batching scheduler for text generation: a pure state machine.

One step is one forward pass. ``plan`` says which waiting requests are admitted (and so
prefilled) this step and which running ones decode one token; ``update`` frees the ones
that finished. Admission control is by KV-cache reservation: a request reserves
``prompt + max_new_tokens`` tokens of cache for its whole life, and is admitted only
while the reservations fit the budget, so the cache can never run out mid-way. The engine
keeps the running rows in one left-padded rectangular cache, so by default the reservation
is counted as the rectangle it may grow to (rows x the largest reservation), not the sum:
that is the memory really allocated at the worst moment.

The scheduler holds the engine's own request records (anything with an ``id`` and a
``reservation``): one record per request. ``check`` refuses, with the numbers, a request
that could never fit (longer than the context, or than the whole budget); the engine calls
it once, when the request is submitted. No torch, no threads, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from sureserve.errors import InputTooLongError


class Reserving(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def reservation(self) -> int: ...


R = TypeVar("R", bound=Reserving)


@dataclass(frozen=True)
class StepPlan:
    prefill: tuple[int, ...]  # admitted this step: run their prompts, emit their first token
    decode: tuple[int, ...]  # already running: one more token each


@dataclass
class GenerationScheduler(Generic[R]):
    kv_budget_tokens: int
    context_limit: int
    max_running: int = 64
    rectangular: bool = True  # count rows x largest reservation (the engine's cache layout)
    waiting: OrderedDict[int, R] = field(default_factory=OrderedDict)
    running: dict[int, R] = field(default_factory=dict)

    @property
    def reserved(self) -> int:
        return self._cost([r.reservation for r in self.running.values()])

    def _cost(self, reservations: list[int]) -> int:
        if not reservations:
            return 0
        if self.rectangular:
            return len(reservations) * max(reservations)
        return sum(reservations)

    def check(self, prompt_len: int, max_new_tokens: int, index: int = -1) -> None:
        """Refuse, with the numbers, a request that could never be admitted."""
        need = prompt_len + max_new_tokens
        what = f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {need}"
        if need > self.context_limit:
            raise InputTooLongError(
                f"{what} exceeds the model's context of {self.context_limit} tokens",
                "shorten the prompt or lower max_new_tokens",
                index=index, length=need, limit=self.context_limit)
        if need > self.kv_budget_tokens:
            raise InputTooLongError(
                f"{what} needs more KV cache than the whole budget of {self.kv_budget_tokens} "
                "tokens", "lower max_new_tokens, or raise the KV-cache budget: --kv-cache-mb "
                "(SURESERVE_KV_CACHE_MB)", index=index, length=need, limit=self.kv_budget_tokens)

    def add(self, request: R) -> None:
        """Queue a request that passed ``check``."""
        if request.id in self.waiting or request.id in self.running:
            raise ValueError(f"request {request.id} is already scheduled")
        self.waiting[request.id] = request

    def plan(self) -> StepPlan:
        """Admit waiting requests first-come first-served while their reservation fits."""
        decode = tuple(self.running)
        admitted: list[int] = []
        reservations = [r.reservation for r in self.running.values()]
        for rid, request in self.waiting.items():
            if len(self.running) + len(admitted) >= self.max_running:
                break
            if self._cost([*reservations, request.reservation]) > self.kv_budget_tokens:
                break  # FIFO: a big request is not overtaken forever by small ones
            admitted.append(rid)
            reservations.append(request.reservation)
        for rid in admitted:
            self.running[rid] = self.waiting.pop(rid)
        return StepPlan(tuple(admitted), decode)

    def update(self, finished: Iterable[int]) -> None:
        """Free finished requests (stop token, stop string, length, cancelled, error)."""
        for rid in finished:
            self.running.pop(rid, None)
            self.waiting.pop(rid, None)
