"""Per-request sampling parameters and the token choice for one decode step.

Every running row of a batch can carry its own parameters; greedy rows (the common case,
and the one that must match ``model.generate``) take one batched argmax, the others are
processed row by row (``scores``), in the order vLLM applies them: OpenAI's ``logit_bias``
→ repetition penalty (transformers' CTRL rule, over prompt and output) → OpenAI's
frequency and presence penalties (over the output only) → the grammar's mask (structured
output: ``grammar.py``) → greedy argmax, or temperature → top-k → top-p → sample. Each
request that samples owns a ``torch.Generator`` seeded from its ``seed``, so a seeded
request draws the same tokens whoever shares its batch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sureserve.errors import InputError
from sureserve.settings import Settings

MAX_STOPS = 4  # OpenAI's limit; every stop string is searched after every token
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


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
    # OpenAI's: a generated token's logit loses count x frequency_penalty, and
    # presence_penalty once it has appeared in the output (-2..2; negative encourages)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # token id -> added to its logit (-100..100: -100 bans it, 100 forces it); a mapping
    # (keys may be strings of digits, as OpenAI's JSON sends them), stored as sorted pairs
    logit_bias: Any = ()  # Mapping[int | str, float] or (id, bias) pairs, as given
    # log-probabilities of each generated token and of this many alternatives (None: off)
    logprobs: int | None = None
    # an llguidance grammar (``grammar.grammar_for``): only tokens it allows are chosen
    grammar: str | None = None

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
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2 <= value <= 2:
                raise bad(name, value, "it must be between -2 and 2 (0 is no penalty)")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.logprobs is not None and (isinstance(self.logprobs, bool)
                                          or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise bad("logprobs", self.logprobs,
                      f"it must be an integer between 0 and {MAX_TOP_LOGPROBS} (alternatives "
                      "per token), or left out")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "it must be an integer in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as validated: sorted ``(token id, bias)`` pairs."""
        return cast(tuple[tuple[int, float], ...], self.logit_bias)

    @property
    def output_penalties(self) -> bool:
        """Whether the frequency or presence penalty needs the output's token counts."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def _argmax_of_logits(self) -> bool:
        """Greedy with no bias or penalty: the choice is an argmax of the raw logits (of
        those the grammar allows, when there is one)."""
        return self.greedy and self.repetition_penalty == 1 and not self.output_penalties \
            and not self.logit_bias

    @property
    def grammar_greedy(self) -> bool:
        """Greedy with a grammar and nothing else that changes the logits."""
        return self._argmax_of_logits and self.grammar is not None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the batched argmax is the answer."""
        return self._argmax_of_logits and self.grammar is None


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted ``(token id, bias)`` pairs, each checked (a 422 naming the
    entry: a key that is no token id, a value out of OpenAI's -100..100)."""
    fix = 'send {"token id": bias} with integer ids and biases between -100 and 100'
    items = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
    if len(items) > MAX_LOGIT_BIAS:
        raise InputError(f"logit_bias has {len(items)} entries (at most {MAX_LOGIT_BIAS})",
                         "send fewer")
    out: dict[int, float] = {}
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InputError(f"logit_bias entry {item!r} is not a (token id, bias) pair", fix)
        key, value = item
        try:
            tid = int(key) if not isinstance(key, bool | float) else None
        except (TypeError, ValueError):
            tid = None
        if tid is None or tid < 0 or (isinstance(key, str) and not key.strip().isdigit()):
            raise InputError(f"logit_bias key {key!r} is not a token id", fix)
        if not _finite(value) or not -100 <= value <= 100:
            raise InputError(f"logit_bias[{key!r}]={value!r} is invalid: it must be "
                             "between -100 and 100", fix)
        out[tid] = float(value)
    return tuple(sorted(out.items()))


@dataclass
class RowState:
    """What the chooser needs to know about one running row."""

    params: SamplingParams
    seen: list[int]  # prompt + generated token ids, for the repetition penalty
    generator: Any = field(default=None)  # torch.Generator when sampling
    counts: Counter[int] = field(default_factory=Counter)  # generated ids (OpenAI penalties)
    matcher: Any = None  # llguidance matcher when the request has a grammar

    def observe(self, token: int) -> None:
        """Record a generated token for the penalties and the grammar that need it."""
        if self.params.repetition_penalty != 1:
            self.seen.append(token)
        if self.params.output_penalties:
            self.counts[token] += 1
        if self.matcher is not None:
            self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more (only the end of sequence)."""
        return self.matcher is not None and self.matcher.is_stopped()


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


def scores(logits: Any, row: RowState) -> Any:
    """One row's logits (vocab) after its logit bias and penalties, before temperature."""
    import torch

    p = row.params
    out = logits.float().clone()
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.bias], device=out.device)
        out[ids] += torch.tensor([b for _, b in p.bias], device=out.device)
    if p.repetition_penalty != 1 and row.seen:
        ids = torch.tensor(sorted(set(row.seen)), device=out.device)
        vals = out[ids]
        # CTRL's rule, as transformers applies it: shrink positive logits, grow negative
        out[ids] = torch.where(vals > 0, vals / p.repetition_penalty,
                               vals * p.repetition_penalty)
    if p.output_penalties and row.counts:
        ids = torch.tensor(list(row.counts), device=out.device)
        counts = torch.tensor(list(row.counts.values()), dtype=out.dtype, device=out.device)
        # OpenAI's definition: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty
        out[ids] -= counts * p.frequency_penalty + p.presence_penalty
    if row.matcher is not None:  # last: no bias or penalty can bring a banned token back
        from sureserve.generation.grammar import allowed

        out.masked_fill_(~allowed(row.matcher, out.shape[-1]).to(out.device), -math.inf)
    return out


def choose(logits: Any, rows: Sequence[RowState]) -> list[int]:
    """The next token of every row from its last-position logits (rows x vocab)."""
    import torch

    picks = logits.argmax(-1).tolist()
    # greedy rows whose only constraint is a grammar: masked and chosen together, one
    # tensor operation for all of them (no per-row copy of the logits)
    masked = [i for i, row in enumerate(rows) if row.params.grammar_greedy]
    if masked:
        from sureserve.generation.grammar import allowed

        ok = torch.stack([allowed(rows[i].matcher, logits.shape[-1]) for i in masked])
        best = logits[masked].masked_fill(~ok.to(logits.device), -math.inf).argmax(-1)
        for i, t in zip(masked, best.tolist(), strict=True):
            picks[i] = t
    for i, row in enumerate(rows):
        p = row.params
        if p.plain_greedy or p.grammar_greedy:
            continue
        s = scores(logits[i], row)
        if p.greedy:
            picks[i] = int(s.argmax())
            continue
        s = s / p.temperature
        if 0 < p.top_k < s.shape[-1]:
            kth = torch.topk(s, p.top_k).values[-1]
            s = s.masked_fill(s < kth, -math.inf)
        if p.top_p < 1:
            ordered, order = torch.sort(s, descending=True)
            probs = torch.softmax(ordered, -1)
            before = torch.cumsum(probs, -1) - probs  # mass strictly above each token
            drop = before >= p.top_p  # keep the smallest set reaching top_p; never empty
            s[order[drop]] = -math.inf
        probs = torch.softmax(s, -1)
        picks[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return [int(t) for t in picks]
