"""Generation behind HTTP: one stepping thread per model, OpenAI completions and chat.

``GenWorker`` runs ``GenerationEngine.step`` on its own thread whenever there is work, so
the event loop only tokenizes, enqueues and forwards text deltas (delivered thread-safely
into one asyncio queue per HTTP request). Backpressure: requests beyond
``max_queue_inputs`` waiting sequences get 429 at once; a request that could never fit the
KV budget or the context gets 413 with the numbers. A client that disconnects (streaming
or not) has its sequences cancelled: their cache rows are freed at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from sureserve.errors import InferenceError, InputError, OverloadedError, SureserveError
from sureserve.server import schemas as S
from sureserve.server.metrics import Metrics
from sureserve.settings import Settings
from sureserve.tasks.generate import GenerationEngine, GenEvent
from sureserve.tasks.sampling import SamplingParams

log = logging.getLogger("sureserve.server")

#: accepted and ignored: they do not change the output
HARMLESS_EXTRAS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
#: OpenAI parameters refused unless they have their neutral value
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "top_logprobs":
           None, "logit_bias": None, "echo": False, "suffix": None, "best_of": 1,
           "tools": None, "tool_choice": None, "functions": None, "response_format": None}
MAX_N = 16


class GenWorker:
    def __init__(self, name: str, gen: GenerationEngine, settings: Settings,
                 metrics: Metrics) -> None:
        self.name, self.gen, self.settings, self.metrics = name, gen, settings, metrics
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"generate-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        m = self.metrics
        while not self._stopping:
            if not self.gen.has_work:
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            start = time.perf_counter()
            self.gen.step()  # never raises for a bad request: those finish with an error
            m.step_seconds.labels(self.name).observe(time.perf_counter() - start)
            m.gen_running.labels(self.name).set(self.gen.running)
            m.gen_waiting.labels(self.name).set(self.gen.waiting)
            m.kv_reserved.labels(self.name).set(self.gen.reserved_tokens)
            m.kv_bytes.labels(self.name).set(self.gen.cache_bytes)

    def check_capacity(self, adding: int) -> None:
        """Refuse at once (429) when the waiting sequences would pass max_queue_inputs;
        checked before a stream's 200 goes out."""
        limit = self.settings.max_queue_inputs
        if self.gen.waiting + adding > limit:
            self.metrics.rejected.inc()
            raise OverloadedError.queue_full(self.gen.waiting, adding, limit, "sequences")

    async def events(self, prompts: Sequence[list[int]], params: SamplingParams
                     ) -> AsyncIterator[tuple[int, GenEvent]]:
        """(prompt index, event) for every prompt until all finish. Cancelling the consumer
        (client gone) cancels the sequences."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, GenEvent]] = asyncio.Queue()
        m, name = self.metrics, self.name

        def deliver(index: int) -> Any:
            def on_event(ev: GenEvent) -> None:  # runs on the stepping thread
                if ev.finish_reason not in ("cancelled", "error"):  # one event = one token
                    (m.ttft if ev.first else m.itl).labels(name).observe(ev.wait_s)
                    m.gen_tokens.labels(name).inc()
                loop.call_soon_threadsafe(queue.put_nowait, (index, ev))
            return on_event

        ids: list[int] = []
        open_ = set(range(len(prompts)))
        try:
            for k, p in enumerate(prompts):
                ids.append(self.gen.submit(p, params, deliver(k)))
            self._wake.set()
            while open_:
                k, ev = await queue.get()
                if ev.finish_reason is not None:
                    open_.discard(k)
                yield k, ev
        finally:
            for k in open_:
                if k < len(ids):
                    self.gen.cancel(ids[k])
            self._wake.set()


# ---- routes -----------------------------------------------------------------------------

def _params(body: S._GenParams, max_tokens: int | None, settings: Settings) -> SamplingParams:
    extras = dict(body.model_extra or {})
    refused = [k for k, v in extras.items() if k in NEUTRAL and v not in (NEUTRAL[k], None)]
    unknown = [k for k in extras if k not in NEUTRAL and k not in HARMLESS_EXTRAS]
    if refused or unknown:
        names = ", ".join(refused + unknown)
        raise InputError(f"unsupported parameter(s): {names}",
                         "remove them (use repetition_penalty instead of frequency/presence "
                         "penalties); sureserve refuses what it would otherwise ignore")
    if not 1 <= body.n <= MAX_N:
        raise InputError(f"n={body.n} is invalid: it must be between 1 and {MAX_N}",
                         "send a smaller n")
    return SamplingParams(max_new_tokens=max_tokens or settings.max_new_tokens,
                          temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          repetition_penalty=body.repetition_penalty, stop=body.stop or (),
                          seed=body.seed)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def install_generation_routes(app: FastAPI, state: Any, errors: dict[int | str, Any],
                              until_done_or_gone: Any) -> None:
    settings: Settings = state.settings

    def prepare(body: S._GenParams, model: str | None, prompts: list[Any],
                max_tokens: int | None) -> tuple[Any, list[list[int]], SamplingParams]:
        slot = state.pick(model, "generate")
        params = _params(body, max_tokens, settings)
        gen: GenerationEngine = slot.engine.generator
        encoded = [gen.encode(p) for p in prompts]
        if len(encoded) * body.n > settings.max_client_batch:
            raise InputError(f"{len(encoded)} prompts x n={body.n} sequences in one request; "
                             f"the limit is {settings.max_client_batch}",
                             "split the request, or raise --max-client-batch "
                             "(SURESERVE_MAX_CLIENT_BATCH)", http_status=413)
        for i, ids in enumerate(encoded):
            gen.sched.check(i, len(ids), params.max_new_tokens)  # 413 now, with the numbers
        seqs = [ids for ids in encoded for _ in range(body.n)]
        slot.gen.check_capacity(len(seqs))  # 429 before a stream's 200 goes out
        return slot, seqs, params

    async def collect(slot: Any, prompts: list[list[int]], params: SamplingParams
                      ) -> list[GenEvent]:
        last: dict[int, GenEvent] = {}
        async for k, ev in slot.gen.events(prompts, params):
            if ev.finish_reason is not None:
                if ev.error:
                    raise _model_error(ev.error)
                last[k] = ev
        return [last[k] for k in range(len(prompts))]

    def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict[str, Any]],
                 use: S.CompletionUsage | None) -> dict[str, Any]:
        out = {"id": rid, "object": obj, "created": created, "model": model,
               "choices": choices}
        if use is not None:
            out["usage"] = use.model_dump()
        return out

    def usage(done: list[GenEvent], prompts: list[list[int]], n: int) -> S.CompletionUsage:
        p = sum(len(x) for x in prompts[::n])
        c = sum(ev.completion_tokens for ev in done)
        return S.CompletionUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def stream(slot: Any, prompts: list[list[int]], params: SamplingParams, body: Any,
               chunk: Any) -> StreamingResponse:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse() -> AsyncIterator[bytes]:
            done: list[GenEvent] = []
            try:
                async for k, ev in slot.gen.events(prompts, params):
                    if ev.error:
                        yield _sse(_model_error(ev.error).openai_body())
                        continue
                    if ev.delta or ev.finish_reason:
                        yield _sse(chunk(k, ev.delta, ev.finish_reason))
                    if ev.finish_reason:
                        done.append(ev)
                if include_usage:
                    yield _sse(chunk(None, "", None, usage(done, prompts, body.n)))
                yield b"data: [DONE]\n\n"
            except SureserveError as exc:  # refused after the headers went out
                yield _sse(exc.openai_body())
                yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=S.CompletionResponse, responses=errors)
    async def completions(body: S.CompletionRequest, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise InputError("prompt is an empty list", "send at least one prompt")
        slot, ids, params = prepare(body, body.model, prompts, body.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(k: int | None, text: str, reason: str | None,
                  use: S.CompletionUsage | None = None) -> dict[str, Any]:
            choices = [] if k is None else [{"index": k, "text": text, "logprobs": None,
                                             "finish_reason": reason}]
            return envelope(rid, "text_completion", created, slot.name, choices, use)

        if body.stream:
            return stream(slot, ids, params, body, chunk)
        done = await until_done_or_gone(request, collect(slot, ids, params))
        return S.CompletionResponse(
            id=rid, created=created, model=slot.name, usage=usage(done, ids, body.n),
            choices=[S.CompletionChoice(index=k, text=_text(ev), finish_reason=ev.finish_reason)
                     for k, ev in enumerate(done)])

    @app.post("/v1/chat/completions", response_model=S.ChatCompletionResponse, responses=errors)
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Any:
        if not body.messages:
            raise InputError("messages is empty", "send at least one message")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content)} for m in body.messages]
        slot, ids, params = prepare(body, body.model, [messages],
                                    body.max_completion_tokens or body.max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        started: set[int] = set()

        def chunk(k: int | None, text: str, reason: str | None,
                  use: S.CompletionUsage | None = None) -> dict[str, Any]:
            choices: list[dict[str, Any]] = []
            if k is not None:
                delta: dict[str, Any] = {}
                if k not in started:  # the first chunk of a choice names the role
                    started.add(k)
                    delta["role"] = "assistant"
                if text or not reason:
                    delta["content"] = text
                choices = [{"index": k, "delta": delta, "logprobs": None,
                            "finish_reason": reason}]
            return envelope(rid, "chat.completion.chunk", created, slot.name, choices, use)

        if body.stream:
            return stream(slot, ids, params, body, chunk)
        done = await until_done_or_gone(request, collect(slot, ids, params))
        return S.ChatCompletionResponse(
            id=rid, created=created, model=slot.name, usage=usage(done, ids, body.n),
            choices=[S.ChatChoice(index=k, message=S.AssistantMessage(content=_text(ev)),
                                  finish_reason=ev.finish_reason)
                     for k, ev in enumerate(done)])


def _model_error(message: str) -> InferenceError:
    return InferenceError(message, "check the prompt; other requests were not affected")


def _text(ev: GenEvent) -> str:
    assert ev.completion is not None  # the last event of a sequence carries it
    return ev.completion.text
