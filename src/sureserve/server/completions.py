"""OpenAI completions and chat completions over the generation worker.

A request is tokenized (chat template included) on the server's tokenizer pool, then
submitted to the model's ``GenWorker``, which validates it once and refuses it (413 never
fits, 429 over capacity) before a stream's 200 goes out; text deltas come back as events.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, cast

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from sureserve.errors import InferenceError, InputError, NotReadyError, SureserveError
from sureserve.generation.continuous import GenerationEngine, GenEvent, PromptScorer, TokenLogprob
from sureserve.generation.grammar import grammar_for
from sureserve.generation.sampling import MAX_TOP_LOGPROBS, SamplingParams
from sureserve.generation.tools import plan as tool_plan
from sureserve.server import schemas as S
from sureserve.server.genworker import Events, GenWorker
from sureserve.server.http import OPENAI_ERRORS, until_done_or_gone
from sureserve.server.state import ServerState
from sureserve.settings import Settings

#: accepted and ignored: they do not change the output
HARMLESS_EXTRAS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
#: OpenAI parameters refused unless they have their neutral value
NEUTRAL = {"suffix": None, "best_of": 1, "functions": None, "function_call": None}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions (chat: top_logprobs <= 20)
MAX_N = 16
Chunk = Callable[..., dict[str, Any] | None]
#: a request's model and its prompts tokenized: name, engine, worker, token ids
Model = tuple[str, GenerationEngine, GenWorker, list[list[int]]]


# ---- routes -----------------------------------------------------------------------------

def _params(body: S._GenParams, max_tokens: int | None, settings: Settings,
            logprobs: int | None) -> SamplingParams:
    extras = dict(body.model_extra or {})
    refused = [k for k, v in extras.items() if k in NEUTRAL and v not in (NEUTRAL[k], None)]
    unknown = [k for k in extras if k not in NEUTRAL and k not in HARMLESS_EXTRAS]
    if refused or unknown:
        names = ", ".join(refused + unknown)
        raise InputError(f"unsupported parameter(s): {names}",
                         "remove them; sureserve refuses what it would otherwise ignore")
    if not 1 <= body.n <= MAX_N:
        raise InputError(f"n={body.n} is invalid: it must be between 1 and {MAX_N}",
                         "send a smaller n")
    return SamplingParams(max_new_tokens=max_tokens or settings.max_new_tokens,
                          temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          repetition_penalty=body.repetition_penalty, stop=body.stop or (),
                          seed=body.seed, frequency_penalty=body.frequency_penalty,
                          presence_penalty=body.presence_penalty,
                          logit_bias=body.logit_bias or (), logprobs=logprobs,
                          grammar=grammar_for(body.response_format,
                                              settings.max_schema_bytes))


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def install_generation_routes(app: FastAPI, state: ServerState) -> None:
    settings: Settings = state.settings

    async def encode(body: S._GenParams, prompts: list[Any],
                     tools: list[dict[str, Any]] | None = None) -> Model:
        """The model for ``body``, and the prompts tokenized off the event loop (chat
        messages with ``tools`` rendered by the template)."""
        slot, engine = state.pick(body.model, "generate")
        state.within_client_batch(len(prompts) * body.n, f"{len(prompts)} prompts x "
                                  f"n={body.n} sequences in one request")
        if slot.gen is None or engine.generation is None:
            raise NotReadyError(f"model {slot.name} is not generating", "wait for GET /health")
        gen = engine.generation
        encoded = await asyncio.get_running_loop().run_in_executor(
            state.tokenizer_pool, lambda: [gen.encode(p, tools) for p in prompts])
        return slot.name, gen, slot.gen, encoded

    async def submit(body: S._GenParams, prompts: list[Any], params: SamplingParams,
                     model: Model | None = None) -> tuple[str, Events, list[int], Any]:
        """Queue every sequence (of ``model``'s prompts, already tokenized, else of
        ``prompts`` tokenized here); returns the model's name, its events, the prompts'
        token counts and its tokenizer."""
        name, gen, worker, encoded = model or await encode(body, prompts)
        seqs = [ids for ids in encoded for _ in range(body.n)]
        return name, worker.submit(seqs, params), [len(x) for x in encoded], gen.tok

    async def echoed(body: S.CompletionRequest, prompts: list[Any]
                     ) -> tuple[Model, list[list[TokenLogprob]] | None]:
        """``echo``: the model and the prompts tokenized (kept for the generation that
        follows, if any) and, when logprobs are asked, each prompt token's log-probability
        (one forward per prompt, on the model's stepping thread)."""
        model = await encode(body, prompts)
        _, gen, worker, encoded = model
        gen.check(encoded, 1)  # within the context (413 with the numbers)
        lps = None
        if body.logprobs is not None:
            # one call per prompt (other requests' steps run between them); a prompt that
            # starts like the one before (a harness's choices after one context) reuses it
            scorer = PromptScorer(gen, body.logprobs)
            lps = [await worker.call(functools.partial(scorer.score, ids)) for ids in encoded]
        return model, lps

    async def collect(events: Events, count: int) -> list[GenEvent]:
        last: dict[int, GenEvent] = {}
        async for k, ev in events:
            if ev.finish_reason is not None:
                if ev.error:
                    raise _model_error(ev.error)
                last[k] = ev
        return [last[k] for k in range(count)]

    def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict[str, Any]],
                 use: S.CompletionUsage | None) -> dict[str, Any]:
        out = {"id": rid, "object": obj, "created": created, "model": model,
               "choices": choices}
        if use is not None:
            out["usage"] = use.model_dump()
        return out

    def usage(done: list[GenEvent], prompt_tokens: list[int]) -> S.CompletionUsage:
        p = sum(prompt_tokens)
        c = sum(ev.completion_tokens for ev in done)
        return S.CompletionUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def stream(events: Events | None, prompt_tokens: list[int], body: Any, chunk: Chunk,
               first: Sequence[dict[str, Any]] = ()) -> StreamingResponse:
        """Server-sent events: the ``first`` chunks (an echoed prompt), then one chunk per
        piece of text of ``events`` (none: the first chunks are the whole answer)."""
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse() -> AsyncIterator[bytes]:
            done: list[GenEvent] = []
            for c in first:
                yield _sse(c)
            if events is None:
                if include_usage:
                    p = sum(prompt_tokens)
                    yield _sse(chunk(None, "", None, S.CompletionUsage(
                        prompt_tokens=p, completion_tokens=0, total_tokens=p)))
                yield b"data: [DONE]\n\n"
                return
            # a token's log-probability waits for the chunk that carries its text (text is
            # held back while it could still be a stop string or half a UTF-8 character)
            pending: dict[int, list[TokenLogprob]] = {}
            try:
                async for k, ev in events:
                    if ev.error:
                        yield _sse(_model_error(ev.error).openai_body())
                        continue
                    if ev.logprob is not None:
                        pending.setdefault(k, []).append(ev.logprob)
                    if ev.delta or ev.finish_reason:
                        piece = chunk(k, ev.delta, ev.finish_reason, lps=pending.pop(k, []))
                        if piece is not None:  # None: held back (a tool call being written)
                            yield _sse(piece)
                    if ev.finish_reason:
                        done.append(ev)
                if include_usage:
                    yield _sse(chunk(None, "", None, usage(done, prompt_tokens)))
                yield b"data: [DONE]\n\n"
            except SureserveError as exc:  # refused after the headers went out
                yield _sse(exc.openai_body())
                yield b"data: [DONE]\n\n"
            finally:  # client gone mid-stream: stop its sequences now
                events.close()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=S.CompletionResponse,
              responses=OPENAI_ERRORS)
    async def completions(body: S.CompletionRequest, request: Request) -> Any:
        prompts = _prompts(body.prompt)
        if not prompts or any(isinstance(p, list) and not p for p in prompts):
            raise InputError("prompt is an empty list", "send at least one prompt (text or "
                             "token ids)")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InputError(f"logprobs={body.logprobs} is invalid: /v1/completions gives 0 to "
                             f"{MAX_COMPLETION_LOGPROBS} alternatives per token",
                             f"send 0..{MAX_COMPLETION_LOGPROBS} (/v1/chat/completions' "
                             "top_logprobs goes to 20)")
        if body.max_tokens == 0 and not body.echo:
            raise InputError("max_tokens=0 generates nothing",
                             "send max_tokens >= 1, or echo: true to score the prompt alone")
        params = _params(body, body.max_tokens, settings, body.logprobs)  # before any work
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        offsets: dict[int, int] = {}  # each choice's text offset so far, across chunks
        # echo: each choice starts with its prompt (text, and its tokens' logprobs)
        head_text: list[str] = []
        head_lps: list[list[TokenLogprob]] = []
        model: Model | None = None
        if body.echo:
            model, plps = await echoed(body, prompts)
            name, tok = model[0], model[1].tok
            head_text = [p if isinstance(p, str) else tok.decode(p)
                         for p in prompts for _ in range(body.n)]
            head_lps = [lp for lp in (plps or [[] for _ in prompts]) for _ in range(body.n)]
            prompt_tokens = [len(ids) for ids in model[3]]

        def logprobs_of(k: int, lps: list[TokenLogprob]) -> dict[str, Any] | None:
            if body.logprobs is None:
                return None
            out = _completion_logprobs(tok, lps, offsets.get(k, 0))
            offsets[k] = offsets.get(k, 0) + sum(map(len, out["tokens"]))
            return out

        def chunk(k: int | None, text: str, reason: str | None,
                  use: S.CompletionUsage | None = None,
                  lps: list[TokenLogprob] | None = None) -> dict[str, Any]:
            choices = [] if k is None else [{"index": k, "text": text,
                                             "logprobs": logprobs_of(k, lps or []),
                                             "finish_reason": reason}]
            return envelope(rid, "text_completion", created, name, choices, use)

        if body.echo and body.max_tokens == 0:  # the prompts scored, nothing generated
            if body.stream:
                return stream(None, prompt_tokens, body, chunk,
                              [chunk(k, t, "length", lps=head_lps[k])
                               for k, t in enumerate(head_text)])
            p = sum(prompt_tokens)
            return S.CompletionResponse(
                id=rid, created=created, model=name, usage=S.CompletionUsage(
                    prompt_tokens=p, completion_tokens=0, total_tokens=p),
                choices=[S.CompletionChoice(index=k, text=t, finish_reason="length",
                                            logprobs=logprobs_of(k, head_lps[k]))
                         for k, t in enumerate(head_text)])
        name, events, prompt_tokens, tok = await submit(body, prompts, params, model)
        if body.stream:
            return stream(events, prompt_tokens, body, chunk,
                          [chunk(k, t, None, lps=head_lps[k])
                           for k, t in enumerate(head_text)])
        try:
            done = await until_done_or_gone(request, collect(events, len(prompt_tokens) * body.n))
        finally:  # also when the client left before ``collect`` began
            events.close()
        return S.CompletionResponse(
            id=rid, created=created, model=name, usage=usage(done, prompt_tokens),
            choices=[S.CompletionChoice(
                index=k, text=(head_text[k] if body.echo else "") + _text(ev),
                finish_reason=_reason(ev),
                logprobs=logprobs_of(k, (head_lps[k] if body.echo else []) + _lps(ev)))
                for k, ev in enumerate(done)])

    @app.post("/v1/chat/completions", response_model=S.ChatCompletionResponse,
              responses=OPENAI_ERRORS)
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Any:
        if not body.messages:
            raise InputError("messages is empty", "send at least one message")
        messages = [_message(m) for m in body.messages]
        if body.top_logprobs is not None and not body.logprobs:
            raise InputError("top_logprobs was sent without logprobs: true",
                             "send logprobs: true with it, or leave top_logprobs out")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(f"top_logprobs={body.top_logprobs} is invalid: it must be "
                             f"between 0 and {MAX_TOP_LOGPROBS}", "send a smaller top_logprobs")
        asked = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, body.max_completion_tokens or body.max_tokens, settings, asked)
        tools = None
        if body.tools is not None or body.tool_choice is not None:
            slot, engine = state.pick(body.model, "generate")
            tools = tool_plan(body.tools, body.tool_choice,
                              getattr(engine.tokenizer, "chat_template", None), slot.name,
                              settings.max_schema_bytes)
            if tools is not None:
                params = tools.constrain(params)
        model = await encode(body, [messages], tools.render if tools else None)
        name, events, prompt_tokens, tok = await submit(body, [messages], params, model)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        started: set[int] = set()
        # with tools, a choice's text is held until it is known to be a plain answer (auto:
        # its first character is neither '<' nor '{') or, finished, turned into tool calls
        held: dict[int, tuple[str, list[TokenLogprob]]] = {}
        plain: set[int] = set()

        def chunk(k: int | None, text: str, reason: str | None,
                  use: S.CompletionUsage | None = None,
                  lps: list[TokenLogprob] | None = None) -> dict[str, Any] | None:
            choices: list[dict[str, Any]] = []
            calls = None
            if k is not None and tools is not None and tools.mode != "none" and k not in plain:
                before, kept = held.pop(k, ("", []))
                text, lps = before + text, kept + (lps or [])
                if tools.mode == "auto" and text and text[0] not in "<{":
                    plain.add(k)  # a plain answer (the grammar's rule): streamed from here
                elif reason is None:
                    held[k] = (text, lps)
                    return None
                elif calls := tools.finished(text, reason):
                    text, reason = "", "tool_calls"
            if k is not None:
                delta: dict[str, Any] = {}
                if k not in started:  # the first chunk of a choice names the role
                    started.add(k)
                    delta["role"] = "assistant"
                if calls:
                    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                elif text or not reason:
                    delta["content"] = text
                choices = [{"index": k, "delta": delta,
                            "logprobs": None if asked is None else
                            _chat_logprobs(tok, lps or []),
                            "finish_reason": reason}]
            return envelope(rid, "chat.completion.chunk", created, name, choices, use)

        if body.stream:
            return stream(events, prompt_tokens, body, chunk)
        try:
            done = await until_done_or_gone(request, collect(events, len(prompt_tokens) * body.n))
        finally:
            events.close()

        def choice(k: int, ev: GenEvent) -> S.ChatChoice:
            text, reason = _text(ev), _reason(ev)
            calls = tools.finished(text, reason) if tools is not None else None
            message = S.AssistantMessage(
                content=None, tool_calls=[S.ToolCall.model_validate(c) for c in calls]) \
                if calls else S.AssistantMessage(content=text)
            return S.ChatChoice(index=k, message=message,
                                finish_reason="tool_calls" if calls else reason,
                                logprobs=None if asked is None else
                                _chat_logprobs(tok, _lps(ev)))

        return S.ChatCompletionResponse(
            id=rid, created=created, model=name, usage=usage(done, prompt_tokens),
            choices=[choice(k, ev) for k, ev in enumerate(done)])


def _message(m: S.ChatMessage) -> dict[str, Any]:
    """An OpenAI message as the chat template reads it (developer is system; content parts
    joined; an assistant's earlier tool calls and a tool result's call id kept)."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                           "content": m.content if m.content is None or
                           isinstance(m.content, str) else "".join(p.text for p in m.content)}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _model_error(message: str) -> InferenceError:
    return InferenceError(message, "check the prompt; other requests were not affected")


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]
             ) -> list[str] | list[list[int]]:
    """OpenAI's four prompt shapes as a list of prompts: a text, texts, one prompt's token
    ids, or several prompts' token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(t, str) for t in prompt):
        return [str(t) for t in prompt]
    if all(isinstance(t, int) for t in prompt):
        return [cast(list[int], prompt)]
    return cast(list[list[int]], prompt)


def _reason(ev: GenEvent) -> Literal["stop", "length"]:
    # what a collected (finished, not failed, not cancelled) sequence can end with
    return "length" if ev.finish_reason == "length" else "stop"


def _text(ev: GenEvent) -> str:
    return ev.completion.text if ev.completion is not None else ""


def _lps(ev: GenEvent) -> list[TokenLogprob]:
    return (ev.completion.logprobs or []) if ev.completion is not None else []


def _token(tok: Any, t: int, logprob: float | None) -> dict[str, Any]:
    """OpenAI's token entry: the token's text, its logprob, and the UTF-8 bytes of that
    text (a token that is part of a character decodes to U+FFFD, whose bytes these are)."""
    text = tok.decode([t])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _chat_logprobs(tok: Any, lps: list[TokenLogprob]) -> dict[str, Any]:
    """Chat completions' ``logprobs``: one entry per generated token, each with its
    ``top_logprobs`` (as many as asked)."""
    return {"content": [{**_token(tok, x.token, x.logprob),
                         "top_logprobs": [_token(tok, t, v) for t, v in x.top]}
                        for x in lps], "refusal": None}


def _completion_logprobs(tok: Any, lps: list[TokenLogprob], offset: int = 0
                         ) -> dict[str, Any]:
    """Completions' (legacy) ``logprobs``: parallel lists, ``text_offset`` counted in
    characters from the start of the choice's text; an echoed prompt's first token has
    null for its logprob and its alternatives, as OpenAI returns it."""
    tokens = [tok.decode([x.token]) for x in lps]
    starts = list(itertools.accumulate(map(len, tokens[:-1]), initial=offset))[:len(tokens)]
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [None if x.logprob is None else
                             {tok.decode([t]): v for t, v in x.top} for x in lps],
            "text_offset": starts}
