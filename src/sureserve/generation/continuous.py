"""Text generation with continuous batching over one left-padded KV cache.

The scheduler (``scheduler.py``) decides each step who joins and who decodes; this module
does the tensor work and owns each request's life, in one ``Request`` record:

- each step first prefills (at most ``prefill_tokens`` prompt tokens: the oldest waiting
  prompt and those closest to it in length share one left-padded forward of at most
  ``prefill_group_tokens``, each from its own stored prefix if it found one (``prefix.py``:
  only the rest is computed); a longer prompt runs in chunks across steps; while rows are
  decoding, no new forward starts once ``prefill_group_tokens`` are spent) and hands out
  each forward's first tokens as it ends; a fully prefilled
  row's keys and values are copied, right-aligned, into the in-place left-padded cache
  (``kvcache.PaddedKV``); then one token is decoded for every running row with an
  attention mask that hides the padding and position ids counted per row (a row's
  positions are what they would be alone); finished rows leave at once (the last row
  takes their slot) and padding nobody needs is cut;
- tokens are chosen per row (``sampling.choose``) and released as text through
  ``TextStream`` (stop strings across token boundaries, unfinished UTF-8 held back);
- requests arrive from any thread (``submit``/``cancel`` only touch a locked inbox), are
  validated there once, and wait in the scheduler; one thread at a time runs ``step``. The
  server runs steps on a worker thread (``server/genworker.py``); the Python API runs them in the
  caller's thread, so two threads calling ``generate`` share batches.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sureserve.errors import InputError, OverloadedError
from sureserve.generation.grammar import Grammars
from sureserve.generation.sampling import RowState, SamplingParams, choose, new_generator
from sureserve.generation.scheduler import GenerationScheduler
from sureserve.generation.textstream import TextStream
from sureserve.loading.inspect import kv_bytes_per_token
from sureserve.loading.loader import Loaded
from sureserve.watch.drift import DriftWatch, count_unknown

if TYPE_CHECKING:
    from sureserve.generation.kvcache import PaddedKV  # imports torch: loaded on first use
    from sureserve.generation.prefix import PrefixCache

log = logging.getLogger("sureserve.generate")

#: plain text, token ids (OpenAI's completions accept them; evaluation harnesses send them),
#: or chat messages
Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


@dataclass
class TokenLogprob:
    """A generated token's log-probability and the most likely tokens at its step: the
    log-softmax of the model's raw logits over the whole vocabulary, before logit_bias,
    penalties, temperature and top-k/top-p (what the model says, not what was sampled
    from; vLLM's default too)."""

    token: int
    logprob: float | None  # None: a prompt's first token (nothing comes before it)
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Completion:
    """One finished request."""

    text: str
    finish_reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's shape (Engine.complete, tools)


@dataclass
class GenEvent:
    """New text for one request (``delta`` may be empty while text is held back)."""

    seq_id: int
    delta: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    wait_s: float  # since submission (first token) or since the previous token
    first: bool
    error: str | None = None
    completion: Completion | None = None  # on the last event
    logprob: TokenLogprob | None = None  # this event's token's, when asked
    # on the first event: from submission to the start of the prompt's first forward (the
    # rest of wait_s is the prefill); None on the others
    queued_s: float | None = None


@dataclass
class Request:
    """One request, from submission to its last event (the scheduler holds it too)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    text: TextStream
    row: RowState
    on_event: Callable[[GenEvent], None] | None
    submitted: float = field(default_factory=time.perf_counter)
    last: float = 0.0
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # real tokens in the cache for this row
    done: Completion | None = None
    # prefill state, between admission and the first token: tokens whose keys/values
    # exist (a reused prefix, then chunks), held in ``past`` (a shared prefix's tensors,
    # or this request's own cache once a chunk ran); ``chain`` names a shared prefix
    computed: int = 0
    past: Any = None
    chain: int = 0
    reused: int = 0  # prompt tokens taken from the prefix cache
    started: float = 0.0  # when the prompt's first forward began (0: not yet)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when params.logprobs is set

    @property
    def reservation(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens


class GenerationEngine:
    def __init__(self, loaded: Loaded, kv_budget_tokens: int = 65_536,
                 max_running: int = 64, *, layout: bool = False,
                 layout_home: Path | None = None, prefill_tokens: int = 512,
                 prefill_group_tokens: int = 128,
                 prefix_cache_bytes: int = 0, prefix_block: int = 16,
                 direct_decode: bool = True, decode_script: bool = True,
                 decode_kernel: bool = False, packing: Any = None,
                 panel_bytes: int = 0) -> None:
        from sureserve.generation import attention, native
        from sureserve.generation.direct import plan as plan_decode
        from sureserve.generation.layout import plan_and_apply

        self.loaded = loaded
        # masked prefills of a grouped-query model read its key/value heads in place instead
        # of copies per query head (the same bits; ``attention.py``)
        self.gqa_prefill = attention.apply(loaded.model, loaded.plan.device)
        # before anything runs the model (the gate included): it is checked as it will run
        self.layout = plan_and_apply(loaded.model, loaded.plan.device, layout_home, layout)
        # oneDNN packed linears (``loading/packed.py``, applied by the Engine before this):
        # the kernel is weighed against them where they run, and decode steps above the
        # kernel's rows take them
        self.packing = packing
        # after the layout: the direct step holds the weights as they will be
        # the GEMV kernel is measured against torch's on this model's shapes (cached per
        # machine); only the direct step uses it, so it is not built without one
        self.kernel = native.plan(loaded.model, loaded.plan.device, layout_home,
                                  decode_kernel and direct_decode, packing, panel_bytes)
        self.decode = plan_decode(loaded.model, direct_decode, decode_script, self.kernel,
                                  packing=packing, home=layout_home)
        # prompts' products read the kernel's panels where they measured faster than
        # torch's at prompt-sized row counts (the prefill is most of a short request's
        # time to first token; ``native.PromptPanels``)
        self.prompt_panels = native.give_prompt_panels(loaded.model, self.kernel) > 0
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.device = loaded.plan.device
        self.context = int(loaded.limit.value)
        self.kv_budget_tokens = kv_budget_tokens
        self.bytes_per_token = kv_bytes_per_token(loaded.config, loaded.plan.dtype) or 0
        self.sched: GenerationScheduler[Request] = GenerationScheduler(
            kv_budget_tokens, self.context, max_running)
        self.eos_ids = _eos_ids(loaded)
        # the logits' width (logit_bias ids are checked against it)
        head = self.model.get_output_embeddings()
        self.vocab_size = int(getattr(head, "out_features", 0)
                              or getattr(self.model.config, "vocab_size", 0))
        self.grammars = Grammars(self.tok, self.vocab_size, self.eos_ids)  # structured output
        self._ids = itertools.count()
        self._inbox: list[Request] = []
        self._cancels: set[int] = set()
        self._lock = threading.Lock()  # inbox and cancels
        self._step_lock = threading.Lock()  # one step at a time
        self._seqs: dict[int, Request] = {}  # scheduled (waiting or running)
        self._rows: list[Request] = []  # running, in cache row order
        self._finished: dict[int, Completion] = {}
        self._kv: PaddedKV | None = None  # created from the first prefill's shapes
        # admitted, prompt not yet fully prefilled (FIFO); at most ``prefill_tokens`` prompt
        # tokens are computed per step, so running rows keep decoding between the chunks
        # of a long prompt or of a burst of prompts
        self._prefilling: list[Request] = []
        self.prefill_tokens = max(1, prefill_tokens)
        # several prompts share a forward up to this many padded tokens: each forward's
        # requests get their first token as it ends, so smaller groups get a burst's first
        # tokens out sooner (measured: a 32-prompt burst of short chats, TTFT p50 0.64-0.68
        # -> 0.39-0.44 s at 128 instead of one 512-token group, throughput within noise)
        self.prefill_group_tokens = max(1, prefill_group_tokens)
        self.prefix: PrefixCache | None = None
        if prefix_cache_bytes > 0:
            from sureserve.generation.prefix import PrefixCache

            self.prefix = PrefixCache(prefix_cache_bytes, prefix_block)
        self.watch: DriftWatch | None = None  # the engine's drift watch (sureserve.load)

    def decode_path(self) -> str:
        """Which decode step runs, its matmul kernels and the weight layout it reads
        (``/info``)."""
        parts = [self.decode.describe()]
        if self.decode.direct is None or self.decode.direct.kernel is None:
            parts.append(f"decode matmuls: {self.kernel.describe()}")
        if self.packing is not None:
            parts.append(self.packing.describe())
        if self.gqa_prefill:
            parts.append("masked prefills read grouped key/value heads in place")
        return "; ".join([*parts, self.layout.describe()])

    # ---- requests ---------------------------------------------------------------------
    def encode(self, prompt: Prompt, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt; chat messages go through the chat template exactly once
        (the rendered text already holds the special tokens, so none are added again),
        with ``tools`` (OpenAI's function tools) when given."""
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty", "send at least one character")
            return list(self.tok(prompt)["input_ids"])
        if prompt and all(isinstance(t, int) for t in prompt):
            # token ids as they are (``check`` refuses ids outside the vocabulary)
            return [int(t) for t in prompt]  # type: ignore[arg-type]
        messages = [dict(m) for m in prompt]  # type: ignore[arg-type]
        if not messages:
            raise InputError("messages is empty", "send at least one message")
        for i, m in enumerate(messages):
            calls_only = m.get("content") is None and m.get("tool_calls")
            if not isinstance(m.get("role"), str) or \
                    not (isinstance(m.get("content"), str) or calls_only):
                raise InputError(f"message {i} needs a string 'role' and 'content'",
                                 "send messages like {'role': 'user', 'content': 'Hi'}")
        if not getattr(self.tok, "chat_template", None):
            raise InputError(f"{self.loaded.source.identifier} has no chat template",
                             "send a plain text prompt instead of messages")
        from sureserve.generation.tools import for_template

        text = self.tok.apply_chat_template(for_template(messages), tools=tools,
                                            tokenize=False, add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               on_event: Callable[[GenEvent], None] | None = None,
               max_waiting: int | None = None) -> list[int]:
        """Queue requests (token ids), all or none: each is validated here, once, and one
        that could never fit is refused at once with the numbers; then, if they would take
        the waiting requests past ``max_waiting``, all are refused (429). Returns their ids."""
        if params.bias and params.bias[-1][0] >= self.vocab_size:
            raise InputError(f"logit_bias names token id {params.bias[-1][0]}, but this "
                             f"model's vocabulary has {self.vocab_size} tokens",
                             f"send token ids below {self.vocab_size}")
        self.check(prompts, params.max_new_tokens)
        # one matcher per sequence, built before anything is queued, so a grammar
        # llguidance cannot enforce is refused (422) with nothing to undo
        matchers = self.grammars.matchers(params.grammar, len(prompts)) if params.grammar \
            else [None] * len(prompts)
        with self._lock:
            if max_waiting is not None and self.waiting + len(prompts) > max_waiting:
                raise OverloadedError.queue_full(self.waiting, len(prompts), max_waiting,
                                                 "sequences")
            made = [Request(next(self._ids), list(ids), params, TextStream(self.tok, params.stop),
                            RowState(params, list(ids) if params.repetition_penalty != 1 else [],
                                     new_generator(params, self.device), matcher=m), on_event)
                    for ids, m in zip(prompts, matchers, strict=True)]
            self._inbox.extend(made)
        if self.watch is not None:
            self.watch.observe_texts([len(p) for p in prompts],
                                     [count_unknown(p, self.watch.unknown_id) for p in prompts])
        return [r.id for r in made]

    def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Each prompt has tokens, all of them ids of this model's vocabulary (one outside
        it would fail the whole batch it joins), and could fit with ``max_new_tokens`` more
        (the context and the KV budget), or is refused at once with the numbers (422/413)."""
        for i, ids in enumerate(prompts):
            if not ids:
                raise InputError(f"prompt {i} has no tokens", "send a non-empty prompt")
            if not 0 <= min(ids) <= max(ids) < self.vocab_size:
                bad = next(t for t in ids if not 0 <= t < self.vocab_size)
                raise InputError(f"prompt {i} holds token id {bad}, but this model's "
                                 f"vocabulary has {self.vocab_size} tokens",
                                 f"send token ids from 0 to {self.vocab_size - 1} (ids of "
                                 "this model's tokenizer)")
            self.sched.check(len(ids), max_new_tokens, i)

    def cancel(self, seq_id: int) -> None:
        """Stop a request (client gone): its slot and cache rows are freed at the next step."""
        with self._lock:
            self._cancels.add(seq_id)

    def result(self, seq_id: int) -> Completion | None:
        """The completion of a finished request submitted without ``on_event`` (handed
        out once), else None."""
        with self._lock:
            return self._finished.pop(seq_id, None)

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self.sched.waiting or self.sched.running)

    @property
    def prefilling(self) -> int:
        """Admitted requests whose prompt is not fully prefilled yet."""
        return len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self.sched.waiting)

    @property
    def running(self) -> int:
        return len(self.sched.running)

    @property
    def reserved_tokens(self) -> int:
        return self.sched.reserved

    @property
    def cache_bytes(self) -> int:
        """KV-cache bytes allocated now (the buffer, headroom included)."""
        return self._kv.allocated_bytes if self._kv is not None else 0

    # ---- synchronous helpers (the Python API) -----------------------------------------
    def run(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams]
            ) -> list[Completion]:
        """Generate for every prompt (token ids), stepping in this thread; input order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids: list[int] = []
        out: dict[int, Completion] = {}
        try:
            for p, sp in zip(prompts, plist, strict=True):
                ids += self.submit([p], sp)
            while len(out) < len(ids):
                self.step()
                for i in ids:
                    if i not in out and (c := self.result(i)) is not None:
                        out[i] = c
            return [out[i] for i in ids]
        finally:
            for i in ids:
                if i not in out:  # we are leaving early (an exception): free their slots
                    self.cancel(i)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenEvent]:
        """Events of one request as they come; closing the iterator cancels the request."""
        events: list[GenEvent] = []
        (seq_id,) = self.submit([prompt_ids], params, events.append)
        finished = False
        try:
            while not finished:
                if not events:
                    self.step()
                while events:
                    ev = events.pop(0)
                    finished = ev.finish_reason is not None
                    yield ev
        finally:
            if not finished:
                self.cancel(seq_id)
                self.step()  # free its slot now rather than at someone's next step

    def generate_ids(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids, prompt excluded): the server's warm-up, the
        benchmarks' and the tests' plain call."""
        done = self.run(prompts, SamplingParams(max_new_tokens=max_new_tokens))
        return [c.token_ids for c in done]

    def prompt_logprobs(self, ids: Sequence[int], top: int, chunk: int = 256
                        ) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (the first has
        none), with ``top`` alternatives: what OpenAI's ``echo`` + ``logprobs`` return, and
        what evaluation harnesses score. One plain forward, in chunks of ``chunk`` positions
        so the full-vocabulary logits stay small; between steps (the step lock), never
        inside a batch."""
        return PromptScorer(self, top, chunk).score(ids)

    # ---- one iteration ----------------------------------------------------------------
    def step(self) -> None:
        """Admit, prefill and decode once; deliver events. Safe to call with no work."""
        import torch

        with self._step_lock, torch.inference_mode():
            self._take_inbox()
            plan = self.sched.plan()
            # prefill first, and hand out the first tokens at once: a new request's time
            # to first token does not include the running rows' decode (they decode right
            # after, the new rows with them)
            for seq_id in plan.prefill:
                self._admit(self._seqs[seq_id])
            if self._prefilling:
                self._prefill_some()
            if self._rows:
                try:
                    self._deliver(self._decode())
                except Exception as exc:
                    log.exception("decode step failed")
                    for seq in list(self._rows):
                        self._finish(seq, "error", error=f"the model raised: {exc}")
                    self._drop_finished()

    def _deliver(self, stepped: list[Request]) -> None:
        """Each stepped row's newest token out as text; finished rows leave."""
        now = time.perf_counter()
        for seq in stepped:
            if seq.done is None:
                self._advance(seq, now)
        self._drop_finished()

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        for seq in inbox:
            self._seqs[seq.id] = seq
            self.sched.add(seq)
        for seq_id in cancels:
            gone = self._seqs.get(seq_id)
            if gone is not None and gone.done is None:
                self._finish(gone, "cancelled")
        self._drop_finished()

    def _decode(self) -> list[Request]:
        import torch

        rows, kv = self._rows, self._kv
        assert kv is not None
        kv.reserve(1, max(s.params.max_new_tokens - len(s.tokens) for s in rows))
        width = kv.width + 1
        lengths = torch.tensor([s.length + 1 for s in rows], device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :]
                >= (width - lengths)[:, None]).long()
        last = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)
        pos = (lengths - 1)[:, None]
        direct = self.decode.direct
        if direct is not None:
            # no row padded: no mask at all (what transformers passes SDPA then too)
            padded = None if all(s.length + 1 == width for s in rows) else mask.bool()
            logits = direct.step(last, pos, kv, padded)
        else:
            logits = self.model(input_ids=last, attention_mask=mask, position_ids=pos,
                                cache=kv.cache, use_cache=True).logits[:, -1]
        kv.advance(1)
        for s, t in zip(rows, choose(logits, [s.row for s in rows]), strict=True):
            s.length += 1
            s.tokens.append(t)
        _note_logprobs(logits, rows)
        return list(rows)

    # ---- prefill ------------------------------------------------------------------------
    def _admit(self, seq: Request) -> None:
        """Queue an admitted request for prefill (its reusable prefix is looked up when its
        turn comes: a prompt prefilled meanwhile may have stored it)."""
        self._prefilling.append(seq)

    def _reuse_prefixes(self) -> None:
        """Point every request that has not started its prefill at the longest stored
        prefix of its prompt. Called before each group is formed, so in a burst of prompts
        sharing a system prompt the first one computes it and the others reuse it; prompts
        given the same stored prefix share one copy of its tensors."""
        if self.prefix is None:
            return
        shared: dict[int, tuple[Any, Any]] = {}
        for seq in self._prefilling:
            if seq.chain > 0 and isinstance(seq.past, tuple):
                shared.setdefault(seq.chain, seq.past)
        for seq in self._prefilling:
            # not started (a request's own chunks have a negative chain), and a whole
            # block left to gain
            if seq.done is None and seq.chain >= 0 and seq.computed == seq.reused \
                    and len(seq.prompt) - seq.computed > self.prefix.block:
                # the chain's length first: its tensors (a copy of every block) are made
                # once per chain, not once per waiting prompt and step (a burst of 32
                # prompts sharing a 400-token system prompt copied 20 MB each time)
                got = self.prefix.match(seq.prompt)
                if got is None or got[0] <= seq.computed:
                    continue
                if got[1] not in shared:
                    hit = self.prefix.lookup(seq.prompt, count=False)
                    assert hit is not None and hit[3] == got[1]
                    shared[got[1]] = (hit[1], hit[2])
                seq.computed, seq.chain = got
                seq.past = shared[seq.chain]
                seq.reused = seq.computed

    def _prefill_some(self) -> None:
        """Run up to ``prefill_tokens`` prompt tokens (at least one forward), oldest first: a
        prompt whose rest is longer than that runs a chunk on its own; otherwise it shares
        one forward with the waiting prompts closest to it in length (``_group``), each from
        its own starting point (nothing, or the stored prefix it found: a burst of chats with
        different histories is one forward, not one per history). Each forward's requests
        get their first token out as soon as it ends, not after the step's other forwards
        (a burst's earliest prompts do not wait for its latest)."""
        budget = self.prefill_tokens
        # while rows are decoding, no new forward starts once a group's worth of tokens
        # (prefill_group_tokens) is spent: they wait for little more than one group per
        # token, and a burst's later groups go in the next steps. That also breaks the
        # lockstep of a burst prefilled at once (its rows would finish together and their
        # clients' next requests arrive together again). Measured in-process, 32 clients,
        # against the whole budget: sharing a stored system prompt, TTFT p50 0.48-0.51 ->
        # 0.24-0.25 s; short chats 0.41-0.44 -> 0.37 s, p99 and tokens/s within noise
        decoding = bool(self._rows)
        while self._prefilling and budget > 0:
            if decoding and self.prefill_tokens - budget >= self.prefill_group_tokens:
                break
            self._reuse_prefixes()
            head = self._prefilling[0]
            if head.done is not None:  # cancelled while waiting to prefill
                self._prefilling.pop(0)
                head.past = None
                continue
            rest = len(head.prompt) - head.computed
            if rest > budget and budget < self.prefill_tokens:
                break  # a chunk gets a fresh step's whole budget
            # alone: a chunk, or the end of a chunked prompt
            group = [head] if rest > budget or head.chain < 0 else \
                self._group(head, min(budget, self.prefill_group_tokens))
            try:
                budget -= self._prefill_group(group, budget)
            except Exception as exc:
                log.exception("prefill failed")
                for seq in group:
                    self._finish(seq, "error", error=f"the model raised on this prompt: {exc}")
            done = []
            for seq in group:
                if seq.done is not None or seq.computed == len(seq.prompt):
                    if seq in self._prefilling:
                        self._prefilling.remove(seq)
                    seq.past = None
                    if seq.done is None:
                        done.append(seq)
            self._deliver(done)

    def _group(self, head: Request, budget: int) -> list[Request]:
        """The oldest waiting prompt and those closest to it in length, while the padded
        forward stays within ``budget`` tokens: a burst of prompts of mixed lengths pads
        little (FIFO order padded a 20-token prompt to its 60-token neighbour), and no
        prompt waits behind younger ones for more than the steps its elders take."""
        def rest(seq: Request) -> int:
            return len(seq.prompt) - seq.computed

        pool = [s for s in self._prefilling[1:]
                if s.done is None and s.chain >= 0 and rest(s) <= budget]
        pool.sort(key=lambda s: abs(rest(s) - rest(head)))  # stable: FIFO among equals
        group, width = [head], rest(head)
        for seq in pool:
            wider = max(width, rest(seq))
            if (len(group) + 1) * wider <= budget:
                group.append(seq)
                width = wider
        return group

    def _past(self, group: list[Request], start: int) -> Any:
        """The cache a group's forward starts from: its rows' reused prefixes right-aligned
        at column ``start`` (the longest), zeros where a row has less (masked, and zero so
        that no stale NaN reaches the attention scores)."""
        import torch
        from transformers.cache_utils import Cache, DynamicLayer

        past = group[0].past
        if past is not None and not isinstance(past, tuple):  # this request's own chunks
            return past
        layers: list[Any] = [DynamicLayer() for _ in range(self._layers())]
        n = len(group)
        if all(seq.past is past for seq in group):
            if past is not None:  # one stored prefix for every row: the same tensors
                k, v = past
                for i, layer in enumerate(layers):
                    layer.update(k[i][None].expand(n, -1, -1, -1),
                                 v[i][None].expand(n, -1, -1, -1))
            return Cache(layers=layers)
        k0 = next(seq.past for seq in group if seq.past is not None)[0]
        ks = k0.new_zeros((k0.shape[0], n, k0.shape[1], start, k0.shape[3]))
        vs = torch.zeros_like(ks)
        for r, seq in enumerate(group):
            if seq.past is not None:
                ks[:, r, :, start - seq.computed:] = seq.past[0]
                vs[:, r, :, start - seq.computed:] = seq.past[1]
        for i, layer in enumerate(layers):
            layer.update(ks[i], vs[i])
        return Cache(layers=layers)

    def _prefill_group(self, group: list[Request], budget: int) -> int:
        """One forward over ``group``; each row starts from its own computed prefix (they
        are right-aligned at the longest, and each row's chunk is left-padded after it).
        Rows that reach the end of their prompt get their first token and join the batch
        cache. Returns the padded tokens computed."""
        import torch

        from sureserve.generation import native

        now = time.perf_counter()
        for seq in group:
            seq.started = seq.started or now
        starts = [seq.computed for seq in group]
        start = max(starts)
        n = len(group)
        if self.prefix is not None and group[0].chain >= 0:  # the start of these prompts
            for seq in group:
                self.prefix.record(seq.reused)
        cache = self._past(group, start)
        chunks = [seq.prompt[s:s + budget] for seq, s in zip(group, starts, strict=True)]
        width = max(len(c) for c in chunks)
        ids = torch.full((n, width), self._pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((n, start + width), dtype=torch.long, device=self.device)
        pos = torch.zeros((n, width), dtype=torch.long, device=self.device)
        for r, (c, s) in enumerate(zip(chunks, starts, strict=True)):
            mask[r, start - s:start] = 1  # its prefix, then padding, then its chunk
            ids[r, width - len(c):] = torch.tensor(c, device=self.device)
            mask[r, start + width - len(c):] = 1
            pos[r, width - len(c):] = torch.arange(s, s + len(c), device=self.device)
        kw: dict[str, Any] = {"attention_mask": mask} if n > 1 or start else {}
        if n > 1 or start:
            kw["position_ids"] = pos
        with native.prompt_panels() if self.prompt_panels else nullcontext():
            res = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1,
                             **kw)
        if n == 1 and start + len(chunks[0]) < len(group[0].prompt):
            # a long prompt's chunk: keep its own cache, choose nothing yet (a seeded
            # sampler's stream must not move)
            group[0].computed = start + len(chunks[0])
            group[0].past, group[0].chain = res.cache, -group[0].id - 1
            return width
        tokens = choose(res.logits[:, -1], [seq.row for seq in group])
        layers = res.cache.layers
        # room for every admitted prompt still to join, in one go (each reallocation
        # copies the cache and touches fresh pages: a burst must not pay it row by row)
        pending = [s for s in self._prefilling if s.done is None]
        self._room(len(pending), max(len(s.prompt) for s in pending), layers[0].keys,
                   max(s.params.max_new_tokens for s in [*pending, *self._rows]))
        for r, (seq, s, c, token) in enumerate(zip(group, starts, chunks, tokens,
                                                   strict=True)):
            seq.computed = s + len(c)
            keys = [self._row(layer.keys, r, start, s, width, len(c)) for layer in layers]
            values = [self._row(layer.values, r, start, s, width, len(c)) for layer in layers]
            self._join(seq, keys, values, token)
            if self.prefix is not None:  # read back from the row it joined (no copy)
                assert self._kv is not None
                self.prefix.store(seq.prompt, *self._kv.row(self._kv.n - 1, seq.computed))
        _note_logprobs(res.logits[:, -1], group)
        return n * width

    @staticmethod
    def _row(t: Any, r: int, start: int, own: int, width: int, length: int) -> Any:
        """Row ``r``'s real columns as views: its ``own`` prefix (right-aligned at
        ``start``), then its chunk without the padding (two pieces, which the batch cache
        writes in place: joining them first cost a copy of the row)."""
        if width == length and own == start:
            return t[r:r + 1]
        return (t[r:r + 1, :, start - own:start], t[r:r + 1, :, start + width - length:])

    def _layers(self) -> int:
        return int(getattr(self.loaded.config, "num_hidden_layers", 0) or
                   len(self.model.model.layers))

    @property
    def _pad_id(self) -> int:
        pad = self.tok.pad_token_id
        return int(pad if pad is not None else next(iter(self.eos_ids), 0))

    def _room(self, rows: int, length: int, like: Any, ahead: int = 0) -> None:
        """The batch cache (created from the first prefill's shapes) with room for
        ``rows`` more rows of up to ``length`` tokens."""
        if self._kv is None:
            from sureserve.generation.kvcache import PaddedKV

            self._kv = PaddedKV(self._layers(), like.shape[1], like.shape[3], like.dtype,
                                like.device, self.sched.max_running)
        self._kv.make_room(rows, length, ahead)

    def _join(self, seq: Request, keys: list[Any], values: list[Any], token: int) -> None:
        """A fully prefilled row enters the batch cache with its first token."""
        if self._kv is None:
            from sureserve.generation.kvcache import pieces

            layer = pieces(keys[0])
            self._room(1, sum(p.shape[2] for p in layer), layer[0])
        assert self._kv is not None
        self._kv.add_row(keys, values)
        seq.length = len(seq.prompt)
        seq.tokens.append(token)
        self._rows.append(seq)

    def _advance(self, seq: Request, now: float) -> None:
        """Turn the row's newest token into text and decide whether it is finished."""
        token = seq.tokens[-1]
        seq.row.observe(token)
        first = len(seq.tokens) == 1
        wait = now - (seq.submitted if first else seq.last)
        seq.last = now
        reason = None
        if token in self.eos_ids or seq.row.complete:  # a finished grammar is a stop too
            reason = "stop"
        elif len(seq.tokens) >= seq.params.max_new_tokens:
            reason = "length"
        delta, hit = seq.text.push(seq.tokens, final=reason is not None)
        if hit:
            reason = "stop"
        logprob = seq.logprobs[-1] if seq.logprobs else None
        if reason is not None:
            self._finish(seq, reason, delta=delta, wait=wait, first=first, logprob=logprob)
        elif seq.on_event is not None:
            seq.on_event(GenEvent(seq.id, delta, None, len(seq.prompt), len(seq.tokens),
                                  wait, first, logprob=logprob,
                                  queued_s=_queued(seq) if first else None))

    def _finish(self, seq: Request, reason: str, *, delta: str = "", wait: float = 0.0,
                first: bool = False, error: str | None = None,
                logprob: TokenLogprob | None = None) -> None:
        seq.done = Completion(seq.text.released, reason, len(seq.prompt), len(seq.tokens),
                              list(seq.tokens), error,
                              list(seq.logprobs) if seq.params.logprobs is not None else None)
        if self.watch is not None:
            self.watch.observe_completion(reason, seq.done.text, seq.tokens)
        if seq.on_event is None:  # kept for ``result``; event consumers get the last event
            with self._lock:
                self._finished[seq.id] = seq.done
        else:
            seq.on_event(GenEvent(seq.id, delta, reason, len(seq.prompt), len(seq.tokens),
                                  wait, first, error, seq.done, logprob,
                                  _queued(seq) if first else None))

    def _drop_finished(self) -> None:
        """Free finished requests: scheduler slots, cache rows, padding columns."""
        gone = [i for i, s in self._seqs.items() if s.done is not None]
        if not gone:
            return
        if self._prefilling:  # cancelled mid-prefill: their partial caches go now
            for s in self._prefilling:
                if s.done is not None:
                    s.past = None
            self._prefilling = [s for s in self._prefilling if s.done is None]
        self.sched.update(gone)
        for i in gone:
            del self._seqs[i]
        rows, kv = self._rows, self._kv
        leaving = [k for k, s in enumerate(rows) if s.done is not None]
        if not leaving:
            return
        assert kv is not None
        for k in reversed(leaving):  # the last row takes the leaver's slot, here as in kv
            kv.remove_row(k)
            rows[k] = rows[-1]
            rows.pop()
        if rows:
            kv.trim(max(s.length for s in rows))
        else:  # idle: give the whole buffer back (the next prefill allocates a fresh one)
            self._kv = None


def _queued(seq: Request) -> float | None:
    """How long ``seq`` waited before its prompt's first forward began (None: it never
    began one)."""
    return max(0.0, seq.started - seq.submitted) if seq.started else None


def _note_logprobs(logits: Any, seqs: Sequence[Request]) -> None:
    """Each asking row's newest token's log-probability and its step's top alternatives,
    from that step's raw logits (rows x vocab, in ``seqs`` order)."""
    want = [(i, s) for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not want:
        return
    entries = _logprob_entries(logits[[i for i, _ in want]], [s.tokens[-1] for _, s in want],
                               [s.params.logprobs or 0 for _, s in want])
    for (_, s), entry in zip(want, entries, strict=True):
        s.logprobs.append(entry)


class PromptScorer:
    """``prompt_logprobs`` for a request's prompts, one call per prompt (so decode steps of
    other requests run between them), where a prompt that starts like the one scored before
    it reuses that prompt's keys/values and entries for the shared part: an evaluation
    harness sends one context followed by each of its choices, and only the choice's own
    tokens are computed again. The entries are those of a plain forward over the whole
    prompt, up to float rounding (the shared part's logits come from another forward)."""

    def __init__(self, gen: GenerationEngine, top: int, chunk: int = 256) -> None:
        self.gen, self.top, self.chunk = gen, top, chunk
        self._ids: list[int] = []
        self._entries: list[TokenLogprob] = []
        self._cache: Any = None

    def score(self, ids: Sequence[int]) -> list[TokenLogprob]:
        import torch

        ids = list(ids)
        shared = 0
        for a, b in zip(self._ids, ids, strict=False):
            if a != b:
                break
            shared += 1
        # restart from the last shared position: its logits predict this prompt's next token
        start = shared - 1 if shared >= 2 and self._cache is not None else 0
        gen = self.gen
        with gen._step_lock, torch.inference_mode():
            if start:
                try:  # keep the first ``start`` positions (transformers: a negative count
                    # of positions to remove)
                    self._cache.crop(-(self._cache.get_seq_length() - start))
                except (ValueError, RuntimeError, AttributeError):
                    start = 0  # a cache that cannot be cut back (sliding windows): anew
            if start:
                out = self._entries[:start + 1]
            else:
                self._cache = None
                out = [TokenLogprob(int(ids[0]), None, [])]
            for a in range(start, len(ids) - 1, self.chunk):
                piece = ids[a:a + self.chunk]
                res = gen.model(input_ids=torch.tensor([piece], device=gen.device),
                                cache=self._cache, use_cache=True)
                self._cache = res.cache
                targets = ids[a + 1:a + len(piece) + 1]  # position j predicts a + j + 1
                out += _logprob_entries(res.logits[0, :len(targets)], targets,
                                        [self.top] * len(targets))
        self._ids, self._entries = ids, out
        return out


def _logprob_entries(logits: Any, tokens: Sequence[int], tops: Sequence[int]
                     ) -> list[TokenLogprob]:
    """``tokens[j]``'s log-probability under logits row ``j`` (rows x vocab, raw), with
    that row's ``tops[j]`` most likely alternatives: generated tokens and echoed prompts
    alike."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    k = max(tops, default=0)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    return [TokenLogprob(int(t), float(lp[j, t]),
                         list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist(), strict=True)))
            for j, (t, n) in enumerate(zip(tokens, tops, strict=True))]


def _eos_ids(loaded: Loaded) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(loaded.model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    for e in eos if isinstance(eos, list) else [eos]:
        if e is not None:
            ids.add(int(e))
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return ids
