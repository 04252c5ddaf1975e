"""The engine: owns model + task + planner and runs texts through them.

``Engine.run`` is the whole offline request path:

    texts → task.preprocess (tokenize once) → apply_policy (error/truncate/chunk)
          → plan_batches (sorted, token budget) → task.forward per batch
          → merge pieces per text → task.postprocess → outputs in input order
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sureserve.batching.planner import padding_ratio, padding_share, plan_batches
from sureserve.errors import InferenceError, InputError, TaskMismatchError
from sureserve.gate.report import GateReport
from sureserve.loading.inspect import kv_bytes_per_token
from sureserve.loading.loader import Loaded
from sureserve.settings import Settings
from sureserve.tasks import TASK_CLASSES, Task
from sureserve.tasks.base import merge
from sureserve.tasks.generate import Completion, GenerationEngine, Prompt
from sureserve.tasks.sampling import SamplingParams


@dataclass
class RunSummary:
    """What one run did, for the user: counts, padding, truncation and the limit in force."""

    texts: int = 0
    pieces: int = 0
    batches: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    truncated: list[int] = field(default_factory=list)
    chunked: dict[int, int] = field(default_factory=dict)
    limit: int = 0
    bound_by: str = ""
    policy: str = "error"
    seconds: float = 0.0

    @property
    def padding_ratio(self) -> float:
        return padding_ratio(self.real_tokens, self.computed_tokens)

    @property
    def padding_share(self) -> float:
        return padding_share(self.real_tokens, self.computed_tokens)

    def add(self, other: RunSummary) -> None:
        """Accumulate a later window's summary into this one (indices are global)."""
        for name in ("texts", "pieces", "batches", "real_tokens", "computed_tokens", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.truncated.extend(other.truncated)
        self.chunked.update(other.chunked)
        self.limit, self.bound_by, self.policy = other.limit, other.bound_by, other.policy

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chunked"] = {str(k): v for k, v in self.chunked.items()}
        d["padding_ratio"] = round(self.padding_ratio, 4)
        d["padding_share"] = round(self.padding_share, 4)
        d["texts_per_s"] = round(self.texts / self.seconds, 1) if self.seconds else None
        return d

    def line(self) -> str:
        parts = [f"{self.texts} texts in {self.seconds:.2f}s",
                 f"{self.real_tokens} real tokens",
                 f"padding {self.padding_ratio:.1%} of real tokens",
                 f"limit {self.limit} tokens ({self.bound_by})"]
        if self.truncated:
            parts.append(f"{len(self.truncated)} TRUNCATED")
        if self.chunked:
            parts.append(f"{len(self.chunked)} split into {sum(self.chunked.values())} windows")
        return ", ".join(parts)


def kv_budget_tokens(loaded: Loaded, settings: Settings) -> int:
    """The kv_cache_mb setting in tokens of this model's cache."""
    per = kv_bytes_per_token(loaded.config, loaded.plan.dtype) or 1
    return max(1, int(settings.kv_cache_mb * 2**20 // per))


class Engine:
    """A loaded model ready to run: returned by ``sureserve.load``."""

    def __init__(self, loaded: Loaded, settings: Settings) -> None:
        self.loaded = loaded
        self.settings = settings
        self.task_name = loaded.task
        cls = TASK_CLASSES.get(loaded.task)
        self.task: Task | None = cls(loaded) if cls else None
        self.last_summary: RunSummary | None = None
        self.gate_report: GateReport | None = None
        self.generator: GenerationEngine | None = None
        if loaded.task == "generate":
            self.generator = GenerationEngine(loaded, kv_budget_tokens(loaded, settings),
                                              settings.max_running_seqs)

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def _require(self, task: str) -> Task:
        if self.task is None or self.task_name != task:
            raise TaskMismatchError(
                f"this model was loaded for {self.task_name!r}, not {task!r}",
                f"load it with task={task!r} if the model has the head for it",
            )
        return self.task

    def run(
        self,
        texts: Sequence[str],
        *,
        truncation: str | None = None,
        first_index: int = 0,
        on_texts_done: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, RunSummary]:
        """Merged per-text rows (pooled embeddings or logits) in input order, and a summary.

        ``first_index`` offsets the indices in errors and the summary, for callers that
        feed a long input in windows.
        """
        task = self.task
        if task is None:
            raise TaskMismatchError(f"run() serves embed/classify; this model is for "
                                    f"{self.task_name!r}", "use the generation API")
        started = time.perf_counter()
        s = self.settings
        policy = truncation or s.truncation
        limit = self.loaded.limit
        res = task.to_pieces(texts, policy, stride=s.chunk_stride, first_index=first_index)
        pieces = res.pieces
        batches = plan_batches([p.weight for p in pieces], s.max_batch_tokens,
                               s.max_batch_size, s.planner_window, s.min_batch_tokens,
                               s.max_padding_share)
        remaining = np.bincount([p.text_index - first_index for p in pieces],
                                minlength=len(texts))
        rows: np.ndarray | None = None
        for batch in batches:
            out = task.forward([pieces[i] for i in batch.ids])
            if rows is None:
                rows = np.empty((len(pieces), out.shape[1]), dtype=np.float32)
            rows[list(batch.ids)] = out
            if on_texts_done is not None:
                done_idx = [pieces[i].text_index - first_index for i in batch.ids]
                np.subtract.at(remaining, done_idx, 1)
                on_texts_done(int(sum(remaining[j] == 0 for j in set(done_idx))))
        width = rows.shape[1] if rows is not None else self._output_width()
        merged = merge(pieces, rows if rows is not None else np.zeros((0, width), np.float32),
                       len(texts), first_index)
        summary = RunSummary(
            texts=len(texts), pieces=len(pieces), batches=len(batches),
            real_tokens=sum(p.weight for p in pieces),
            computed_tokens=sum(b.cost for b in batches),
            truncated=res.truncated, chunked=res.chunked, limit=limit.value,
            bound_by=limit.bound_by, policy=policy, seconds=time.perf_counter() - started,
        )
        self.last_summary = summary
        return merged, summary

    def _output_width(self) -> int:
        if self.task_name == "classify":
            return len(self._require("classify").labels)  # type: ignore[attr-defined]
        return int(self.loaded.config.get("hidden_size", 0))

    def embed(self, texts: Sequence[str], *, truncation: str | None = None,
              normalize: bool | None = None) -> np.ndarray:
        """Embeddings, shape (n, dim), in input order; unit length if the model says so."""
        task = self._require("embed")
        rows, _ = self.run(texts, truncation=truncation)
        return np.asarray(task.postprocess(rows, normalize=normalize))

    def classify(self, texts: Sequence[str], *, truncation: str | None = None,
                 top_k: int | None = 1) -> list[Any]:
        """Labels with scores, in input order (see ClassifyTask.postprocess for top_k)."""
        task = self._require("classify")
        rows, summary = self.run(texts, truncation=truncation)
        out = task.postprocess(rows, top_k=top_k)
        if summary.policy != "error":  # per-item flags whenever cutting was allowed
            cut = set(summary.truncated)
            for i, item in enumerate(out):
                for d in item if isinstance(item, list) else [item]:
                    d["truncated"] = i in cut
                    d["windows"] = summary.chunked.get(i, 1)
        return list(out)

    # ---- generation -----------------------------------------------------------------
    def _gen(self) -> GenerationEngine:
        if self.generator is None:
            raise TaskMismatchError(
                f"this model was loaded for {self.task_name!r}, not 'generate'",
                "load a causal language model (e.g. sureserve.load('smollm2'))")
        return self.generator

    def sampling(self, **params: Any) -> SamplingParams:
        """Sampling parameters, defaults filled in from settings (max_new_tokens)."""
        params = {k: v for k, v in params.items() if v is not None}
        params.setdefault("max_new_tokens", self.settings.max_new_tokens)
        return SamplingParams(**params)

    def complete(self, prompts: Sequence[Prompt], **params: Any) -> list[Completion]:
        """Like ``generate`` with the details: finish_reason, token counts, token ids."""
        gen = self._gen()
        if isinstance(prompts, str):
            raise InputError("prompts must be a list", "wrap a single prompt: [prompt]")
        sp = self.sampling(**params)
        return gen.run([gen.encode(p) for p in prompts], sp)

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, stop: str | Sequence[str] = (),
                 seed: int | None = None) -> list[str]:
        """Generated text of each prompt (without the prompt), in input order.

        A prompt is a string, or a list of chat messages (``{"role", "content"}``) to which
        the model's chat template is applied once. ``temperature=0`` is greedy; the default
        ``max_new_tokens`` is the ``max_new_tokens`` setting. All prompts run together with
        continuous batching (and with concurrent calls from other threads)."""
        done = self.complete(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                             stop=stop, seed=seed)
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
