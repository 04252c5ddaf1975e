"""The engine: a loaded model ready to run, returned by ``sureserve.load``.

Every embed/classify request takes one path, whoever sends it (``embed``/``classify``,
the CLI file jobs, the server's batcher):

    prepare texts → task.to_pieces (tokenize once, truncation policy) → Job of pieces
    forward a batch of pieces → rows (the only call into the task's forward; packed rows,
            and ``forward_isolating``: a failing batch split until the bad input is found)
            -- the caller decides the batches: ``run`` plans them offline with
            ``plan_batches``; the server's batcher queues them with other requests' pieces
    finish  rows per piece → merge per text → task.postprocess (+ per-text flags) → Result
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sureserve.batching.packing import pack_rows
from sureserve.batching.planner import padding_ratio, plan_batches
from sureserve.batching.truncation import Piece
from sureserve.errors import InferenceError, InputError, InputTooLongError, TaskMismatchError
from sureserve.gate.report import GateReport
from sureserve.generation.continuous import Completion, GenerationEngine, Prompt
from sureserve.generation.sampling import SamplingParams
from sureserve.loading.inspect import kv_bytes_per_token
from sureserve.loading.loader import Loaded
from sureserve.loading.packed import plan_and_apply as plan_packing
from sureserve.settings import Settings
from sureserve.tasks import TASK_CLASSES, Task
from sureserve.tasks.base import merge
from sureserve.tasks.embed import EmbedTask
from sureserve.watch.drift import DriftWatch, count_unknown

log = logging.getLogger("sureserve.engine")


@dataclass
class RunSummary:
    """What one run did, for the user: counts, padding, truncation and the limit in force."""

    texts: int = 0
    pieces: int = 0
    batches: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    truncated: list[int] = field(default_factory=list)
    chunked: dict[int, int] = field(default_factory=dict)  # text index -> its chunks
    limit: int = 0
    bound_by: str = ""
    policy: str = "error"
    seconds: float = 0.0
    drift: list[dict[str, Any]] = field(default_factory=list)  # offline jobs: every signal

    @property
    def padding_ratio(self) -> float:
        return padding_ratio(self.real_tokens, self.computed_tokens)

    def add(self, other: RunSummary) -> None:
        """Accumulate a later window's summary into this one (indices are global)."""
        for name in ("texts", "pieces", "batches", "real_tokens", "computed_tokens", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.truncated.extend(other.truncated)
        self.chunked.update(other.chunked)
        if other.texts:  # a window of bad lines only ran nothing: it knows no limit
            self.limit = other.limit or self.limit
            self.bound_by = other.bound_by or self.bound_by
            self.policy = other.policy

    def flags(self, index: int) -> dict[str, Any]:
        """Whether text ``index`` (global) was truncated, and into how many chunks it ran."""
        return {"truncated": index in self.truncated, "chunks": self.chunked.get(index, 1)}

    def line(self) -> str:
        parts = [f"{self.texts} texts in {self.seconds:.2f}s",
                 f"{self.real_tokens} real tokens",
                 f"padding {self.padding_ratio:.1%} of real tokens",
                 f"limit {self.limit} tokens ({self.bound_by})"]
        if self.truncated:
            parts.append(f"{len(self.truncated)} TRUNCATED")
        if self.chunked:
            parts.append(f"{len(self.chunked)} split into {sum(self.chunked.values())} chunks")
        return ", ".join(parts)


@dataclass
class Job:
    """Texts tokenized and cut to the truncation policy, waiting for their pieces' rows."""

    pieces: list[Piece]
    summary: RunSummary  # counts filled by prepare; batches and computed tokens by the runner
    first_index: int
    started: float
    lengths: list[int] = field(default_factory=list)  # each text's tokens, before any cut
    blank: list[bool] = field(default_factory=list)  # empty or whitespace-only texts


@dataclass
class Result:
    outputs: Any  # task.postprocess: (n, dim) float32 vectors, or label dicts; input order
    rows: np.ndarray  # merged per text, before post-processing (pooled vectors or logits)
    summary: RunSummary


_threads_lock = threading.Lock()


def forward_workers(setting: int | None, cpu: bool, generating: bool = False) -> int:
    """How many forward passes an encoder model runs at once, decided here for every path
    (``Engine.run``, the server's batchers; a Ray Data actor sets the setting to 1, the
    actors being the parallelism): the ``forward_workers`` setting when given; else two
    single-threaded passes on a CPU with 2+ torch threads, which beat one two-threaded pass
    (BENCHMARKS.md), and one on a GPU or beside a generation model (torch's thread count is
    per process)."""
    if setting is not None:
        return setting
    import torch

    return 2 if cpu and not generating and torch.get_num_threads() >= 2 else 1


@contextlib.contextmanager
def forward_pool(workers: int) -> Iterator[Callable[[Callable[[Any], Any], Sequence[Any]],
                                                     Iterator[Any]]]:
    """``map`` over batches with ``workers`` forward passes at once, each with an equal
    share of torch's threads (restored after). torch's thread count is per process, so
    concurrent offline runs are serialised while they change it."""
    if workers <= 1:
        yield lambda fn, items: map(fn, items)
        return
    import torch

    with _threads_lock:
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, before // workers))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="sureserve-forward") as pool:
                yield lambda fn, items: pool.map(fn, items)
        finally:
            torch.set_num_threads(before)


def kv_budget_tokens(loaded: Loaded, settings: Settings) -> int:
    """The kv_cache_mb setting in tokens of this model's cache."""
    per = kv_bytes_per_token(loaded.config, loaded.plan.dtype) or 1
    return max(1, int(settings.kv_cache_mb * 2**20 // per))


class Engine:
    """A loaded model ready to run: returned by ``sureserve.load``."""

    def __init__(self, loaded: Loaded, settings: Settings) -> None:
        self.loaded = loaded
        self.settings = settings
        self.task_name = loaded.task_name
        cls = TASK_CLASSES.get(loaded.task_name)
        self.task: Task | None = cls(loaded) if cls else None
        self.last_summary: RunSummary | None = None
        self.gate_report: GateReport | None = None
        self.watch: DriftWatch | None = None  # set by sureserve.load (drift_watch setting)
        self.generation: GenerationEngine | None = None
        # before anything runs the model (the gate included): it is checked as it will run
        self.packing = plan_packing(loaded.model, loaded.plan.device, settings.home_dir(),
                                    settings.packed_linear,
                                    int(settings.packed_linear_mb * 2**20))
        if loaded.task_name == "generate":
            self.generation = GenerationEngine(loaded, kv_budget_tokens(loaded, settings),
                                               settings.max_running_seqs,
                                               layout_home=settings.home_dir(),
                                               layout=settings.decode_weight_layout,
                                               direct_decode=settings.direct_decode,
                                               decode_script=settings.decode_script,
                                               decode_kernel=settings.decode_kernel,
                                               packing=self.packing,
                                               panel_bytes=int(
                                                   settings.decode_panels_mb * 2**20),
                                               prefill_tokens=settings.prefill_tokens,
                                               prefill_group_tokens=(
                                                   settings.prefill_group_tokens),
                                               prefix_cache_bytes=int(
                                                   settings.prefix_cache_mb * 2**20))

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def text_task(self, task_name: str | None = None) -> Task:
        if self.task is None or (task_name is not None and self.task_name != task_name):
            want = task_name or "embed or classify"
            raise TaskMismatchError(f"this model was loaded for {self.task_name!r}, not {want}",
                                    f"load a model that does {want} (with task= if its head "
                                    "can)")
        return self.task

    def policy(self, truncation: str | None = None) -> str:
        """The truncation policy in force: the caller's, else the ``truncation`` setting
        (the one place that default is resolved)."""
        return truncation or self.settings.truncation

    def prepare(self, texts: Sequence[str], *, truncation: str | None = None,
                first_index: int = 0, query: str | Sequence[str] | None = None,
                direction: str = "right", prompt_name: str | None = None,
                max_text_tokens: int | None = None) -> Job:
        """Tokenize once and apply the truncation policy. ``first_index`` offsets the
        indices in errors and the summary, for callers that feed a long input in windows;
        ``query``: a reranker's, paired with every text (or one per text); ``direction``:
        the end a cut takes tokens from ("right" keeps the start, "left" the end);
        ``prompt_name``: see ``prompted``; ``max_text_tokens``: a reranker's cap on each
        text (``RerankTask.to_pieces``)."""
        task = self.text_task()
        policy = self.policy(truncation)
        given = texts
        texts = self.prompted(texts, prompt_name)
        try:
            cut = task.to_pieces(texts, policy, stride=self.settings.chunk_stride,
                                 first_index=first_index, query=query, direction=direction,
                                 max_text_tokens=max_text_tokens)
        except InputTooLongError as exc:  # refused: still traffic the watch should see
            if self.watch is not None and exc.length:
                self.watch.observe_texts([exc.length], cut=[True])
            raise
        limit = self.loaded.limit
        real = sum(p.weight for p in cut.pieces)
        summary = RunSummary(texts=len(texts), pieces=len(cut.pieces), real_tokens=real,
                             truncated=cut.truncated, chunked=cut.chunked, limit=limit.value,
                             bound_by=limit.bound_by, policy=policy)
        # after to_pieces, which refuses a non-string; the texts as sent, without a prompt
        blank = [not t.strip() for t in given] if self.watch is not None else []
        return Job(cut.pieces, summary, first_index, time.perf_counter(), cut.lengths, blank)

    def finish(self, job: Job, rows: np.ndarray, **options: Any) -> Result:
        """Merge the pieces' rows per text and post-process them (``options`` go to the
        task: ``normalize``, ``top_k``, ``raw_scores``)."""
        task = self.text_task()
        merged = merge(job.pieces, rows, job.summary.texts, job.first_index, task.reduce)
        summary = job.summary
        summary.seconds = time.perf_counter() - job.started
        outputs = task.postprocess(merged, **options)
        if self.watch is not None:
            self._observe(job, merged)
        if summary.policy != "error":  # per-text flags whenever cutting was allowed
            outputs = task.flag(outputs, summary, job.first_index)
        self.last_summary = summary
        return Result(outputs, merged, summary)

    def forward(self, pieces: Sequence[Piece], packed: bool = False) -> tuple[np.ndarray, int]:
        """One batch's rows, in order, and the tokens computed (padding or packing slack
        included): the only call into the task's forward, for ``run`` and the server's
        batchers alike. ``packed``: texts laid end to end in rows (embedding tasks; a
        layout over ``max_batch_tokens`` is split, as first-fit may need a row more than
        the planner counted)."""
        task = self.text_task()
        if not packed:
            return np.asarray(task.forward(pieces)), max(p.weight for p in pieces) * len(pieces)
        layout = pack_rows([p.weight for p in pieces])
        if layout.computed > self.settings.max_batch_tokens and len(pieces) > 1:
            mid = len(pieces) // 2
            (left, lc), (right, rc) = (self.forward(pieces[:mid], packed),
                                       self.forward(pieces[mid:], packed))
            return np.vstack([left, right]), lc + rc
        assert isinstance(task, EmbedTask)  # packing is only ever on for embedding tasks
        return np.asarray(task.forward_packed(pieces, layout)), layout.computed

    def token_states(self, pieces: Sequence[Piece]) -> list[np.ndarray]:
        """Every token's last hidden state per piece, padding dropped (TEI ``/embed_all``):
        the embedding task's unpooled forward."""
        task = self.text_task("embed")
        assert isinstance(task, EmbedTask)
        return list(task.token_states(pieces))

    def forward_isolating(self, pieces: Sequence[Piece], packed: bool = False
                          ) -> tuple[list[np.ndarray | Exception], int]:
        """``forward``, but a batch that raises is split until the inputs that fail alone
        are found: one row or error per piece (a bad input costs only its own request),
        and the tokens computed."""
        try:
            rows, computed = self.forward(pieces, packed)
            return [rows[k] for k in range(len(pieces))], computed
        except Exception as exc:
            if len(pieces) == 1:
                log.warning("input failed in the model: %s", exc)
                return [InferenceError(f"the model raised on this input: {exc}",
                                       "check the input; other requests were not affected")
                        ], pieces[0].weight
            mid = len(pieces) // 2
            left, left_computed = self.forward_isolating(pieces[:mid], packed)
            right, right_computed = self.forward_isolating(pieces[mid:], packed)
            return left + right, left_computed + right_computed

    def _observe(self, job: Job, merged: np.ndarray) -> None:
        """Tell the drift watch what this job held and what the model answered: a few
        numbers per text (the watch computes its signals later, off the request path)."""
        watch, task = self.watch, self.text_task()
        assert watch is not None
        n, first = job.summary.texts, job.first_index
        unknown = [0] * n
        for p in job.pieces:
            unknown[p.text_index - first] += count_unknown(p.ids, watch.unknown_id)
        cut = set(job.summary.truncated) | set(job.summary.chunked)
        watch.observe_texts(job.lengths, unknown, [first + k in cut for k in range(n)],
                            job.blank or None)
        if self.task_name == "classify":
            watch.observe_labels(task.probabilities(merged))  # type: ignore[attr-defined]
        elif self.task_name == "embed":
            watch.observe_vectors(merged)
        elif self.task_name == "sparse":
            watch.observe_sparse(merged)

    def run(self, texts: Sequence[str], *, truncation: str | None = None,
            first_index: int = 0, on_texts_done: Callable[[int], None] | None = None,
            query: str | Sequence[str] | None = None, direction: str = "right",
            prompt_name: str | None = None, **options: Any) -> Result:
        """The offline path: prepare, run the pieces in planned batches, finish."""
        task = self.text_task()
        job = self.prepare(texts, truncation=truncation, first_index=first_index, query=query,
                           direction=direction, prompt_name=prompt_name)
        s, pieces = self.settings, job.pieces
        batches = plan_batches([p.weight for p in pieces], s.max_batch_tokens,
                               s.max_batch_size, s.planner_window, s.min_batch_tokens,
                               s.max_padding_share)
        remaining = np.bincount([p.text_index - first_index for p in pieces],
                                minlength=len(texts))
        rows = np.empty((len(pieces), task.width), dtype=np.float32)

        def forward(batch: Any) -> Any:
            rows[list(batch.ids)] = self.forward([pieces[i] for i in batch.ids])[0]
            return batch

        workers = self.offline_workers()
        total = sum(b.cost for b in batches)
        if batches and max(b.cost for b in batches) * workers > total:
            # a job that cannot be shared out evenly (one query's 40 pairs: a batch of 32
            # and one of 8) runs faster as one pass with every thread than as two
            # single-threaded passes of which one idles
            workers = 1
        with forward_pool(workers) as run_batch:
            for batch in run_batch(forward, batches):
                if on_texts_done is not None:
                    done_idx = [pieces[i].text_index - first_index for i in batch.ids]
                    np.subtract.at(remaining, done_idx, 1)
                    on_texts_done(int(sum(remaining[j] == 0 for j in set(done_idx))))
        job.summary.batches = len(batches)
        job.summary.computed_tokens = sum(b.cost for b in batches)
        return self.finish(job, rows, **options)

    def offline_workers(self) -> int:
        """Forward passes ``run`` keeps going at once (``forward_workers``)."""
        return forward_workers(self.settings.forward_workers,
                               str(self.loaded.plan.device) == "cpu")

    def embed(self, texts: Sequence[str], *, truncation: str | None = None,
              normalize: bool | None = None, truncation_direction: str = "right",
              prompt_name: str | None = None, dimensions: int | None = None,
              precision: str | None = None) -> np.ndarray:
        """Embeddings, shape (n, dim), in input order; unit length if the model says so.
        ``truncation_direction="left"``: a cut keeps a text's end; ``prompt_name``: one of
        the model's prompts (default: its own default, as sentence-transformers applies
        it; "" for none); ``dimensions`` (shorter, renormalised) and ``precision`` (int8,
        uint8, binary, ubinary): only where the model declares them or ``sureserve
        quantize`` measured them (``vectors.py``), refused otherwise."""
        self.text_task("embed")
        self.check_vectors(dimensions, precision)
        return np.asarray(self.run(texts, truncation=truncation, normalize=normalize,
                                   direction=truncation_direction, prompt_name=prompt_name,
                                   dimensions=dimensions, precision=precision).outputs)

    def check_vectors(self, dimensions: int | None, precision: str | None) -> None:
        """Refuse, before any work, a shorter size or a precision this embedding model
        neither declares nor was measured for (``vectors.Allowed.check``; the task's
        postprocess applies them)."""
        if dimensions is None and precision in (None, "float32"):
            return
        self.text_task("embed").vector_forms.check(  # type: ignore[attr-defined]
            dimensions, precision)

    def prompted(self, texts: Sequence[str], prompt_name: str | None = None
                 ) -> Sequence[str]:
        """Texts with one of the model's sentence-transformers prompts in front, as
        sentence-transformers puts it there: ``prompt_name`` None takes the model's
        ``default_prompt_name`` (if it declares one), "" takes none. Only embedding models
        (dense or sparse) have prompts."""
        st = self.loaded.st
        prompts = st.prompts if st is not None and self.task_name in ("embed", "sparse") \
            else {}
        name = (st.default_prompt_name if st is not None and prompts else None) \
            if prompt_name is None else prompt_name
        if not name or not all(isinstance(t, str) for t in texts):
            return texts  # (a non-string is refused, naming it, by the task's to_pieces)
        if name not in prompts:
            have = ", ".join(map(repr, prompts)) or "none"
            raise InputError(f"prompt_name {name!r} is not one of this model's prompts "
                             f"({have})", "leave prompt_name out, or use one the model "
                             "defines (config_sentence_transformers.json)")
        if not prompts[name]:
            return texts
        assert st is not None
        if not st.include_prompt:
            raise InputError(f"this model pools without its prompt's tokens "
                             f"(include_prompt false), which sureserve does not do: its "
                             f"vectors with prompt {name!r} would differ from "
                             "sentence-transformers'", 'send prompt_name "" and put the '
                             "prompt in the text only if the model was trained that way")
        return [prompts[name] + t for t in texts]

    def embed_sparse(self, texts: Sequence[str], *, truncation: str | None = None,
                     top_k: int | None = None, tokens: bool = False,
                     truncation_direction: str = "right", prompt_name: str | None = None
                     ) -> list[list[dict[str, Any]]]:
        """Sparse (SPLADE) vectors, in input order: per text its non-zero terms
        ``{"index": token id, "value": weight}``, strongest first (``top_k``: only the
        strongest; default the ``sparse_top_k`` setting, 0 = all; ``tokens``: each term's
        token text too)."""
        self.text_task("sparse")
        top_k = self.settings.sparse_top_k if top_k is None else top_k
        return list(self.run(texts, truncation=truncation, top_k=top_k, tokens=tokens,
                             direction=truncation_direction,
                             prompt_name=prompt_name).outputs)

    def classify(self, texts: Sequence[str], *, truncation: str | None = None,
                 top_k: int | None = 1, truncation_direction: str = "right") -> list[Any]:
        """Labels with scores, in input order (see ClassifyTask.postprocess for top_k)."""
        self.text_task("classify")
        return list(self.run(texts, truncation=truncation, top_k=top_k,
                             direction=truncation_direction).outputs)

    def rerank(self, query: str, texts: Sequence[str], *, top_n: int | None = None,
               raw_scores: bool = False, return_text: bool = False,
               truncation: str | None = None, truncation_direction: str = "right"
               ) -> list[dict[str, Any]]:
        """``texts`` ranked by relevance to ``query``, best first: ``[{"index", "score",
        "text"?}]`` (``top_n`` best only; ``raw_scores``: logits instead of sigmoids).
        When cutting is allowed, each item also says whether its text was ``truncated``."""
        from sureserve.tasks.rerank import ranked

        self.text_task("rerank")
        res = self.run(texts, truncation=truncation, query=query, raw_scores=raw_scores,
                       direction=truncation_direction)
        flags = res.summary.flags if res.summary.policy != "error" else None
        return ranked(res.outputs, texts, top_n, return_text, flags)

    def rerank_many(self, groups: Sequence[tuple[str, Sequence[str]]], *,
                    top_n: int | None = None, raw_scores: bool = False,
                    return_text: bool = False, truncation: str | None = None,
                    truncation_direction: str = "right") -> list[list[dict[str, Any]]]:
        """``rerank`` for many queries at once: ``[(query, texts), ...]`` -> one ranking per
        query, in order. Every pair goes through one planner window, so the candidates of
        many queries fill batches together (a query's 20 candidates alone make a small,
        badly shaped batch)."""
        from sureserve.tasks.rerank import ranked_groups

        self.text_task("rerank")
        if isinstance(groups, (str, tuple)) or not all(
                isinstance(g, (tuple, list)) and len(g) == 2 for g in groups):
            raise InputError("rerank_many takes a list of (query, texts) pairs",
                             'e.g. [("who won?", ["text", ...]), ...]')
        texts: list[str] = []
        queries: list[str] = []
        for k, (q, docs) in enumerate(groups):
            if isinstance(docs, str) or not isinstance(docs, (list, tuple)):
                raise InputError(f"query {k}'s texts are not a list", "send a list of texts")
            if not isinstance(q, str) or not q.strip():
                raise InputError(f"query {k} is empty or not a string",
                                 "send a non-empty query for every group")
            texts += docs
            queries += [q] * len(docs)
        res = self.run(texts, truncation=truncation, query=queries, raw_scores=raw_scores,
                       direction=truncation_direction)
        flags = res.summary.flags if res.summary.policy != "error" else None
        return ranked_groups(res.outputs, [docs for _, docs in groups], top_n, return_text,
                             flags)

    # ---- generation -----------------------------------------------------------------
    def _gen(self) -> GenerationEngine:
        if self.generation is None:
            raise TaskMismatchError(
                f"this model was loaded for {self.task_name!r}, not 'generate'",
                "load a causal language model (e.g. sureserve.load('smollm2'))")
        return self.generation

    def sampling(self, **params: Any) -> SamplingParams:
        """Sampling parameters, defaults filled in from settings (max_new_tokens);
        ``response_format`` (OpenAI's, for structured output) becomes the grammar."""
        from sureserve.generation.grammar import grammar_for

        params = {k: v for k, v in params.items() if v is not None}
        params.setdefault("max_new_tokens", self.settings.max_new_tokens)
        if "response_format" in params:
            params["grammar"] = grammar_for(params.pop("response_format"),
                                            self.settings.max_schema_bytes)
        return SamplingParams(**params)

    def complete(self, prompts: Sequence[Prompt], *, tools: list[dict[str, Any]] | None = None,
                 tool_choice: Any = None, **params: Any) -> list[Completion]:
        """Like ``generate`` with the details: finish_reason, token counts, token ids, and
        with ``tools`` (OpenAI function tools, chat prompts only) each completion's
        ``tool_calls`` (finish_reason ``tool_calls``) when the model called them."""
        from sureserve.generation.tools import plan as tool_plan

        gen = self._gen()
        if isinstance(prompts, str):
            raise InputError("prompts must be a list", "wrap a single prompt: [prompt]")
        sp = self.sampling(**params)
        tools_plan = None
        if tools is not None or tool_choice is not None:
            if any(isinstance(p, str) for p in prompts):
                raise InputError("tools need chat prompts (lists of messages): a plain text "
                                 "prompt has no template to show them", "send messages")
            tools_plan = tool_plan(tools, tool_choice, getattr(gen.tok, "chat_template", None),
                                   gen.loaded.source.identifier,
                                   self.settings.max_schema_bytes)
            if tools_plan is not None:
                sp = tools_plan.constrain(sp)
        render = tools_plan.render if tools_plan is not None else None
        done = gen.run([gen.encode(p, render) for p in prompts], sp)
        if tools_plan is not None:
            for c in done:
                if calls := tools_plan.finished(c.text, c.finish_reason):
                    c.tool_calls, c.finish_reason = calls, "tool_calls"
        return done

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, stop: str | Sequence[str] = (),
                 seed: int | None = None, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0,
                 logit_bias: dict[int, float] | None = None,
                 response_format: dict[str, Any] | None = None) -> list[str]:
        """Generated text of each prompt (without the prompt), in input order.

        A prompt is a string, or a list of chat messages (``{"role", "content"}``) to which
        the model's chat template is applied once. ``temperature=0`` is greedy; the default
        ``max_new_tokens`` is the ``max_new_tokens`` setting. ``frequency_penalty``,
        ``presence_penalty``, ``logit_bias`` and ``response_format`` (structured output:
        ``{"type": "json_schema", "json_schema": {"schema": {...}}}``) are OpenAI's. All
        prompts run together with continuous batching (and with concurrent calls from
        other threads)."""
        done = self.complete(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                             stop=stop, seed=seed, frequency_penalty=frequency_penalty,
                             presence_penalty=presence_penalty, logit_bias=logit_bias,
                             response_format=response_format)
        for c in done:
            if c.error:
                raise InferenceError(c.error, "check the prompt; other prompts were fine")
        return [c.text for c in done]

    def stream(self, prompt: Prompt, **params: Any) -> Iterator[str]:
        """Text pieces of one prompt as they are generated (same parameters as
        ``generate``); breaking out of the loop cancels the request."""
        gen = self._gen()
        sp = self.sampling(**params)
        for ev in gen.stream(gen.encode(prompt), sp):
            if ev.error:
                raise InferenceError(ev.error, "check the prompt")
            if ev.delta:
                yield ev.delta

    def info(self) -> dict[str, Any]:
        from sureserve.loading.describe import describe_loaded

        return describe_loaded(self.loaded)
