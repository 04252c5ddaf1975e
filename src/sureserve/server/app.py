"""The HTTP app: TEI-style and OpenAI-style routes over the batching engine.

Routes are thin: validate → ``ServerState.run`` → shape the answer. Errors are mapped to
HTTP once, in the exception handlers, in the error shape of the route's family (TEI routes
``{"error", "error_type"}``, ``/v1`` routes OpenAI's ``{"error": {...}}``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import sureserve
from sureserve.errors import InputError, OverloadedError, SureserveError
from sureserve.server import schemas as S
from sureserve.server.generation import install_generation_routes
from sureserve.server.state import EngineFactory, ServerState, default_factory
from sureserve.settings import Settings

OPEN_PATHS = {"/health", "/metrics"}
_VECTORS = TypeAdapter(list[list[float]])
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": S.ErrorBody, "description": "Malformed JSON or invalid UTF-8, or a "
          "model that does not do this task"},
    401: {"model": S.ErrorBody, "description": "Missing or wrong API key"},
    404: {"model": S.ErrorBody, "description": "Unknown model"},
    413: {"model": S.ErrorBody, "description": "Too many inputs, body too large, or an input "
          "too long"},
    422: {"model": S.ErrorBody, "description": "Invalid input"},
    429: {"model": S.ErrorBody, "description": "Queue full; see Retry-After"},
    500: {"model": S.ErrorBody, "description": "The model raised on this input"},
    503: {"model": S.ErrorBody, "description": "Model not ready"},
}
AUTH_ONLY: dict[int | str, dict[str, Any]] = {401: ERRORS[401]}
OPENAI_ERRORS = {k: {**v, "model": S.OpenAIError} for k, v in ERRORS.items()}


def create_app(settings: Settings, models: Sequence[str],
               factory: EngineFactory = default_factory) -> FastAPI:
    state = ServerState(settings, models, factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load_all())
        yield
        loading.cancel()
        await state.stop()

    app = FastAPI(title="sureserve", version=sureserve.__version__, lifespan=lifespan)
    app.state.sureserve = state
    _install_handlers(app, state)
    _install_routes(app, state)
    install_generation_routes(app, state, OPENAI_ERRORS, _until_done_or_gone)
    app.add_middleware(AuthAndMetrics, state=state)
    app.add_middleware(BodyLimit, limit=settings.max_payload_bytes)
    return app


class AuthAndMetrics:
    """API-key check and per-route request metrics, as plain ASGI middleware.

    Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) wraps every request in a
    task group and memory streams, and makes each ``receive`` spawn tasks: measured at 32
    clients, that machinery took a fifth of the event loop's CPU, which competes with the
    forward pass for the same cores."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        settings = self.state.settings
        key = settings.api_key
        if key and not (settings.open_health and path in OPEN_PATHS):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                resp = _error_response(path, SureserveError(
                    "missing or wrong API key", "send 'Authorization: Bearer <key>'",
                    http_status=401))
                await resp(scope, receive, send)
                return
        start = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")
            m = self.state.metrics
            m.requests.labels(name, str(status)).inc()
            m.request_seconds.labels(name).observe(time.perf_counter() - start)


class BodyLimit:
    """Refuse request bodies over the limit with 413, before they are parsed or buffered."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(scope, send, self.limit)
            return
        seen = 0

        async def counting() -> Message:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge()
            return msg

        try:
            await self.app(scope, counting, send)
        except _BodyTooLarge:
            await _too_large(scope, send, self.limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(scope: Scope, send: Send, limit: int) -> None:
    err = InputError(f"request body is larger than {limit} bytes",
                     "send fewer or shorter inputs, or raise --max-payload-bytes "
                     "(SURESERVE_MAX_PAYLOAD_BYTES)", http_status=413)
    resp = _error_response(scope["path"], err)
    await resp(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _error_response(path: str, err: SureserveError) -> JSONResponse:
    headers = {}
    if isinstance(err, OverloadedError):
        headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
    if path.startswith("/v1"):
        body: dict[str, Any] = err.openai_body()
    else:
        body = {"error": err.message, "error_type": err.code, "fix": err.fix}
    return JSONResponse(body, status_code=err.http_status, headers=headers)


def _install_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(SureserveError)
    async def on_error(request: Request, exc: SureserveError) -> JSONResponse:
        return _error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 400 ("error parsing the body") and 404/405 in our error shape too
        msg = "the request body is not valid JSON (or not UTF-8)" if exc.status_code == 400 \
            else str(exc.detail)
        return _error_response(request.url.path, InputError(msg, "see /docs for the routes "
                                                            "and request shapes",
                                                            http_status=exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            err = InputError("the request body is not valid JSON (or not UTF-8)",
                             "send a UTF-8 JSON object", http_status=400)
        else:
            where = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}"
                              for e in errs[:5])
            err = InputError(f"invalid request: {where}", "see /docs for the request shape")
        return _error_response(request.url.path, err)


async def _until_done_or_gone(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (its inputs are dropped).

    The body has been read by now, so the next ASGI message can only be the disconnect:
    waiting for it costs nothing until it happens, where polling ``is_disconnected`` cost
    a wake-up per request every few tens of milliseconds."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise SureserveError("client disconnected", "", http_status=499)


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _install_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", response_model=S.Health,
             responses={503: {"model": S.Health, "description": "Loading or failed"}})
    async def health() -> JSONResponse:
        status = state.status
        reasons = [f"{s.name}: {s.reason}" for s in state.slots.values() if s.reason]
        body = S.Health(status=status, models={s.name: s.state for s in state.slots.values()},
                        reason="; ".join(reasons) or None)
        return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)

    @app.get("/metrics", response_class=Response, responses=AUTH_ONLY)
    async def metrics() -> Response:
        for slot in state.slots.values():
            if slot.batcher:
                state.metrics.queue_depth.labels(slot.name).set(slot.batcher.depth)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info", response_model=S.Info, responses=AUTH_ONLY)
    async def info() -> S.Info:
        infos = [_model_info(s) for s in state.slots.values() if s.engine is not None]
        first = next(iter(state.slots))
        return S.Info(model_id=first, version=sureserve.__version__,
                      max_batch_tokens=state.settings.max_batch_tokens,
                      max_client_batch_size=state.settings.max_client_batch,
                      max_queue_inputs=state.settings.max_queue_inputs,
                      max_input_length=infos[0].max_input_length if infos else 0,
                      models=infos)

    @app.post("/embed", response_model=list[list[float]], responses=ERRORS)
    async def embed(body: S.EmbedRequest, request: Request) -> Response:
        slot = state.pick(body.model, "embed")
        texts = state.validate(body.inputs)
        out = await _until_done_or_gone(request, state.run(slot, texts, body.truncate))
        vecs = slot.engine.task.postprocess(out.rows, normalize=body.normalize)
        # the hottest route: serialise straight from the floats (a third of the CPU of
        # validating them against response_model first, which only documents the shape)
        return Response(_VECTORS.dump_json(vecs.tolist()), media_type="application/json")

    @app.post("/predict", response_model=list[S.Prediction] | list[list[S.Prediction]],
              responses=ERRORS)
    async def predict(body: S.PredictRequest, request: Request) -> Any:
        slot = state.pick(body.model, "classify")
        texts = state.validate(body.inputs)
        out = await _until_done_or_gone(request, state.run(slot, texts, body.truncate))
        task = slot.engine.task
        scores = out.rows if body.raw_scores else task.probabilities(out.rows)
        results = [sorted(({"label": lbl, "score": float(v)} for lbl, v in zip(task.labels, row,
                                                                             strict=True)),
                          key=lambda d: -d["score"]) for row in scores]
        return results[0] if isinstance(body.inputs, str) else results

    @app.post("/tokenize", response_model=list[list[S.SimpleToken]], responses=ERRORS)
    async def tokenize(body: S.TokenizeRequest) -> list[list[S.SimpleToken]]:
        slot = state.pick(body.model, _task_of(state, body.model))
        texts = state.validate(body.inputs)
        tok = slot.engine.tokenizer
        enc = tok(texts, add_special_tokens=body.add_special_tokens,
                  return_offsets_mapping=True, return_special_tokens_mask=True)
        out = []
        for k, ids in enumerate(enc["input_ids"]):
            toks = tok.convert_ids_to_tokens(ids)
            out.append([S.SimpleToken(id=i, text=t, special=bool(sp),
                                      start=None if sp else a, stop=None if sp else b)
                        for i, t, sp, (a, b) in zip(ids, toks, enc["special_tokens_mask"][k],
                                                    enc["offset_mapping"][k], strict=True)])
        return out

    @app.post("/v1/embeddings", response_model=S.OpenAIEmbeddingResponse,
              responses=OPENAI_ERRORS)
    async def openai_embeddings(body: S.OpenAIEmbeddingRequest,
                                request: Request) -> S.OpenAIEmbeddingResponse:
        slot = state.pick(body.model, "embed")
        texts = state.validate(body.input)
        dim = int(slot.engine.loaded.config.get("hidden_size", 0))
        if body.dimensions is not None and body.dimensions != dim:
            raise InputError(f"dimensions={body.dimensions} requested; {slot.name} gives {dim}",
                             "omit dimensions, or send the model's own dimension")
        out = await _until_done_or_gone(request, state.run(slot, texts, False))
        vecs = slot.engine.task.postprocess(out.rows)
        data = [S.OpenAIEmbedding(index=i, embedding=_encode(v, body.encoding_format))
                for i, v in enumerate(vecs)]
        return S.OpenAIEmbeddingResponse(data=data, model=slot.name,
                                         usage=S.Usage(prompt_tokens=out.tokens,
                                                       total_tokens=out.tokens))

    @app.get("/v1/models", response_model=S.OpenAIModelList,
             responses={401: {**ERRORS[401], "model": S.OpenAIError}})
    async def openai_models() -> S.OpenAIModelList:
        return S.OpenAIModelList(data=[S.OpenAIModel(id=n, created=state.started)
                                       for n in state.slots])


def _task_of(state: ServerState, name: str | None) -> str:
    slot = state.slots.get(name) if name else next(iter(state.slots.values()))
    if slot is not None and slot.engine is not None:
        return str(slot.engine.task_name)
    return "embed"


def _encode(vec: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's convention: little-endian float32 bytes, base64
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vec]


def _model_info(slot: Any) -> S.ModelInfo:
    e = slot.engine
    report = e.gate_report
    return S.ModelInfo(
        name=slot.name, task=e.task_name, path=str(e.loaded.source.path),
        max_input_length=e.loaded.limit.value,
        dim=int(e.loaded.config.get("hidden_size", 0)) if e.task_name == "embed" else None,
        labels=e.task.labels if e.task_name == "classify" else None,
        gate_passed=report.passed if report else None,
        gate_overridden=bool(report and report.overridden),
        packed_batches=slot.batcher.packed if slot.batcher else None,
        forward_workers=slot.batcher.workers if slot.batcher else None)
