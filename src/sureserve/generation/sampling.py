"""Per-request sampling parameters and the token choice for one decode step.

Every running row of a batch can carry its own parameters; greedy rows (the common case,
and the one that must match ``model.generate``) take one batched argmax, the others are
processed row by row in the order transformers applies its logits processors:
repetition penalty → temperature → top-k → top-p → sample. Each request that samples
owns a ``torch.Generator`` seeded from its ``seed``, so a seeded request draws the same
tokens whoever shares its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sureserve.errors import InputError
from sureserve.settings import Settings

MAX_STOPS = 4  # OpenAI's limit; every stop string is searched after every token


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature=0`` is greedy (as in the OpenAI
    API); ``top_k=0`` and ``top_p=1`` switch those filters off."""

    # one default, the setting's: the server and the Python API fill in the configured
    # value (``settings.max_new_tokens``); a bare SamplingParams gets the same default
    max_new_tokens: int = Settings.model_fields["max_new_tokens"].default
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()  # a str is one stop string; stored as a tuple
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, rule: str) -> InputError:
            return InputError(f"{name}={value!r} is invalid: {rule}", f"send a valid {name}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "it must be an integer >= 1")
        if not _finite(self.temperature) or not 0 <= self.temperature <= 2:
            raise bad("temperature", self.temperature, "it must be between 0 (greedy) and 2")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "it must be in (0, 1]; 1 keeps every token")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "it must be an integer >= 0; 0 keeps every token")
        if not _finite(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise bad("repetition_penalty", self.repetition_penalty,
                      "it must be in (0, 10]; 1 is no penalty, above 1 discourages repeats")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > MAX_STOPS:
            raise bad("stop", list(stops), f"at most {MAX_STOPS} stop strings")
        if any(not isinstance(s, str) or not s for s in stops):
            raise bad("stop", list(stops), "every stop string must be a non-empty string")
        object.__setattr__(self, "stop", stops)
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "it must be an integer in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class RowState:
    """What the chooser needs to know about one running row."""

    params: SamplingParams
    seen: list[int]  # prompt + generated token ids, for the repetition penalty
    generator: Any = field(default=None)  # torch.Generator when sampling


def new_generator(params: SamplingParams, device: str) -> Any:
    """A generator for a sampling request: seeded when asked, else from fresh entropy."""
    import torch

    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def choose(logits: Any, rows: Sequence[RowState]) -> list[int]:
    """The next token of every row from its last-position logits (rows x vocab)."""
    import torch

    picks = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        p = row.params
        if p.greedy and p.repetition_penalty == 1:
            continue
        scores = logits[i].float().clone()
        if p.repetition_penalty != 1 and row.seen:
            ids = torch.tensor(sorted(set(row.seen)), device=scores.device)
            vals = scores[ids]
            # CTRL's rule, as transformers applies it: shrink positive logits, grow negative
            scores[ids] = torch.where(vals > 0, vals / p.repetition_penalty,
                                      vals * p.repetition_penalty)
        if p.greedy:
            picks[i] = int(scores.argmax())
            continue
        scores = scores / p.temperature
        if 0 < p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if p.top_p < 1:
            ordered, order = torch.sort(scores, descending=True)
            probs = torch.softmax(ordered, -1)
            before = torch.cumsum(probs, -1) - probs  # mass strictly above each token
            drop = before >= p.top_p  # keep the smallest set reaching top_p; never empty
            scores[order[drop]] = -math.inf
        probs = torch.softmax(scores, -1)
        picks[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return [int(t) for t in picks]
