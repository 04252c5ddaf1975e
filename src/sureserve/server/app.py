"""The HTTP app: TEI-style and OpenAI-style routes over the batching engine.

Routes are thin: pick the model → ``Batcher.infer`` (or the generation worker, in
``completions.py``) → shape the answer. Errors are mapped to HTTP once, in the exception
handlers, in the error shape of the route's family (``http.py``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sureserve.errors import AuthError, InputError, SureserveError
from sureserve.server import schemas as S
from sureserve.server.completions import install_generation_routes
from sureserve.server.docs import ASSETS, DOC_PATHS, install_docs
from sureserve.server.http import (
    AUTH_ONLY,
    ERRORS,
    OPENAI_ERRORS,
    error_response,
    health_response,
    until_done_or_gone,
)
from sureserve.server.metrics import Metrics
from sureserve.server.state import EngineFactory, ServerState, Slot, default_factory
from sureserve.server.tei import install_tei_routes, vector_form
from sureserve.settings import Settings
from sureserve.version import __version__

OPEN_PATHS = {"/health", "/metrics", "/ping"}
log = logging.getLogger("sureserve.server")


class Cluster(Protocol):
    """What a replica of a larger deployment (Ray Serve: ``sureserve.ray.board``) adds:
    its state reported where the other replicas see it, and ``/health`` and ``/metrics``
    answered for all of them."""

    async def start(self, state: ServerState) -> None: ...
    async def run(self, state: ServerState) -> None: ...
    async def report(self, state: ServerState) -> None: ...
    async def leave(self) -> None: ...
    async def health(self, state: ServerState) -> tuple[dict[str, Any], int]: ...
    async def metrics(self, state: ServerState) -> bytes: ...


def create_app(settings: Settings, models: Sequence[str],
               factory: EngineFactory = default_factory,
               cluster: Cluster | None = None) -> FastAPI:
    """The app. Alone, it starts answering at once (``/health`` says "loading" until the
    models pass their gate). As a ``cluster`` replica, its start-up waits for the models
    (the proxy sends it nothing until then) and fails if one fails, so that Ray does not
    route traffic to a replica that cannot answer."""
    state = ServerState(settings, models, factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_watch_loop_lag(state.metrics)),
                 asyncio.create_task(state.watch_drift())]
        if cluster is None:
            tasks.append(asyncio.create_task(state.load_all()))
        else:
            await cluster.start(state)
            tasks.append(asyncio.create_task(cluster.run(state)))
            await state.load_all()
            failed = [f"{s.name}: {s.reason}" for s in state.slots.values() if s.reason]
            if failed:
                await cluster.report(state)
                for t in tasks:
                    t.cancel()
                await state.stop()
                raise RuntimeError("; ".join(failed))
        yield
        for t in tasks:
            t.cancel()
        if cluster is not None:
            await cluster.leave()
        await state.stop()

    # FastAPI's /docs and /redoc load their scripts from a public CDN, so they render
    # nothing where servers usually run (no internet): self-hosted below instead
    app = FastAPI(title="sureserve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.sureserve = state
    install_docs(app)
    _install_handlers(app, state)
    _install_routes(app, state, cluster)
    install_tei_routes(app, state)
    install_generation_routes(app, state)
    # BodyLimit inside AuthAndMetrics, so that its 413s are counted in the metrics
    app.add_middleware(BodyLimit, limit=settings.max_payload_bytes)
    app.add_middleware(AuthAndMetrics, state=state)
    return app


class AuthAndMetrics:
    """API-key check and per-route request metrics, as plain ASGI middleware.

    Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) wraps every request in a
    task group and memory streams, and makes each ``receive`` spawn tasks: machinery that
    took a large share of the event loop's CPU (BENCHMARKS.md), which competes with the
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
        if key and not (settings.open_health and path in OPEN_PATHS) \
                and not (path in DOC_PATHS or path.startswith(ASSETS + "/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                resp = error_response(path, AuthError(
                    "missing or wrong API key", "send 'Authorization: Bearer <key>'"))
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
    """Refuse request bodies over the limit with 413, before they are parsed or buffered.

    A client that is still sending when the server answers and closes gets a connection
    reset instead of the 413 (the kernel resets a socket closed with unread data), and
    most clients send the whole body before reading the answer. So an oversized body is
    read and thrown away, up to ``DRAIN_LIMIT`` bytes, before the 413 goes out; past that
    the connection is cut (a body that large is an attack, not a mistake). A client that
    asked ``Expect: 100-continue`` has not sent its body yet: it is answered at once."""

    DRAIN_LIMIT = 64 << 20

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive, 0, min(int(declared), self.DRAIN_LIMIT))
            await _too_large(scope, send, self.limit)
            return
        seen = 0
        answered = False

        async def counting() -> Message:
            # past the limit: drop the rest of the body, answer 413, and tell the app the
            # client is gone (raising here would reach the client as FastAPI's 400 "error
            # parsing the body"); whatever the app then tries to send is dropped
            nonlocal seen, answered
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit and not answered:
                if msg["type"] == "http.request" and msg.get("more_body", False):
                    await _drain(receive, seen, self.DRAIN_LIMIT)
                await _too_large(scope, send, self.limit)
                answered = True
                return {"type": "http.disconnect"}
            return msg

        async def sending(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counting, sending)


async def _drain(receive: Receive, seen: int, upto: int) -> None:
    """Read and drop the rest of a request body, up to ``upto`` bytes in all."""
    while seen < upto:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


async def _too_large(scope: Scope, send: Send, limit: int) -> None:
    err = InputError(f"request body is larger than {limit} bytes",
                     "send fewer or shorter inputs, or raise --max-payload-bytes "
                     "(SURESERVE_MAX_PAYLOAD_BYTES)", http_status=413)
    resp = error_response(scope["path"], err)
    await resp(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _watch_loop_lag(metrics: Metrics, every: float = 0.05) -> None:
    """How late the event loop wakes from a short sleep: the time any request waited for
    the loop because something else held it (tokenizing on it, a slow handler)."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(every)
        metrics.loop_lag.observe(max(loop.time() - start - every, 0.0))


def _install_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(SureserveError)
    async def on_error(request: Request, exc: SureserveError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 400 ("error parsing the body") and 404/405 in our error shape too
        msg = "the request body is not valid JSON (or not UTF-8)" if exc.status_code == 400 \
            else str(exc.detail)
        return error_response(request.url.path, InputError(msg, "see /docs for the routes "
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
        return error_response(request.url.path, err)


def _install_routes(app: FastAPI, state: ServerState, cluster: Cluster | None) -> None:
    @app.get("/health", response_model=S.Health,
             responses={503: {"model": S.Health, "description": "Loading or failed"}})
    async def health() -> JSONResponse:
        if cluster is not None:
            body, code = await cluster.health(state)
            return JSONResponse(S.Health(**body).model_dump(), status_code=code)
        return health_response(state)

    @app.get("/metrics", response_class=Response, responses=AUTH_ONLY)
    async def metrics() -> Response:
        if cluster is not None:  # every replica's, each sample labelled with its replica
            return Response(await cluster.metrics(state), media_type=CONTENT_TYPE_LATEST)
        state.refresh_gauges()
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info", response_model=S.Info, responses=AUTH_ONLY)
    async def info() -> S.Info:
        infos = [i for s in state.slots.values() if (i := _model_info(s)) is not None]
        first = next(iter(state.slots))
        return S.Info(model_id=first, version=__version__,
                      max_batch_tokens=state.settings.max_batch_tokens,
                      max_client_batch_size=state.settings.max_client_batch,
                      max_queue_inputs=state.settings.max_queue_inputs,
                      max_input_length=infos[0].max_input_length if infos else 0,
                      models=infos)

    @app.post("/tokenize", response_model=list[list[S.SimpleToken]], responses=ERRORS)
    async def tokenize(body: S.TokenizeRequest) -> list[list[S.SimpleToken]]:
        _, engine = state.pick(body.model, None)
        texts = state.validate(body.inputs)
        return await asyncio.get_running_loop().run_in_executor(
            state.tokenizer_pool, _tokens, engine.tokenizer, texts, body.add_special_tokens)

    @app.post("/v1/embeddings", response_model=S.OpenAIEmbeddingResponse,
              responses=OPENAI_ERRORS)
    @app.post("/embeddings", response_model=S.OpenAIEmbeddingResponse,
              responses=OPENAI_ERRORS, summary="Alias of /v1/embeddings")
    async def openai_embeddings(body: S.OpenAIEmbeddingRequest,
                                request: Request) -> S.OpenAIEmbeddingResponse:
        batcher = state.batcher(body.model, "embed")
        if not isinstance(body.input, str) and body.input and \
                not all(isinstance(t, str) for t in body.input):
            # ids made by the client's tokenizer (tiktoken, for LangChain's OpenAIEmbeddings)
            # would be read as other words by this model's: vectors of the wrong text
            raise InputError(
                "input holds token ids; they were made by the client's tokenizer, not "
                f"{batcher.name}'s, so embedding them would embed other words and give "
                "silently wrong vectors",
                "send the texts themselves (LangChain: OpenAIEmbeddings(..., "
                "check_embedding_ctx_length=False) sends text)")
        texts = state.validate(cast(list[str] | str, body.input), "input", batcher.engine)
        form = vector_form(batcher.engine, body.dimensions, body.embed_dtype)
        out = await until_done_or_gone(request, batcher.infer(texts, **form))
        data = [S.OpenAIEmbedding(index=i, embedding=_encode(v, body.encoding_format))
                for i, v in enumerate(out.outputs)]
        tokens = out.summary.real_tokens
        return S.OpenAIEmbeddingResponse(data=data, model=batcher.name,
                                         usage=S.Usage(prompt_tokens=tokens,
                                                       total_tokens=tokens))

    @app.get("/v1/models", response_model=S.OpenAIModelList,
             responses={401: {**ERRORS[401], "model": S.OpenAIError}})
    async def openai_models() -> S.OpenAIModelList:
        return S.OpenAIModelList(data=[S.OpenAIModel(id=n, created=state.started)
                                       for n in state.slots])


def _tokens(tok: Any, texts: list[str], special: bool) -> list[list[S.SimpleToken]]:
    enc = tok(texts, add_special_tokens=special, return_offsets_mapping=True,
              return_special_tokens_mask=True)
    out = []
    for k, ids in enumerate(enc["input_ids"]):
        toks = tok.convert_ids_to_tokens(ids)
        out.append([S.SimpleToken(id=i, text=t, special=bool(sp), start=None if sp else a,
                                  stop=None if sp else b)
                    for i, t, sp, (a, b) in zip(ids, toks, enc["special_tokens_mask"][k],
                                                enc["offset_mapping"][k], strict=True)])
    return out


def _encode(vec: np.ndarray, fmt: str) -> list[float] | list[int] | str:
    quantized = vec.dtype.kind != "f"
    if fmt == "base64":  # OpenAI's convention: little-endian float32 bytes, base64
        raw = vec.tobytes() if quantized else np.asarray(vec, dtype="<f4").tobytes()
        return base64.b64encode(raw).decode()
    return [int(x) for x in vec] if quantized else [float(x) for x in vec]


def _model_info(slot: Slot) -> S.ModelInfo | None:
    e = slot.engine
    if e is None:
        return None
    report = e.gate_report
    return S.ModelInfo(
        name=slot.name, task=e.task_name, path=str(e.loaded.source.path),
        max_input_length=e.loaded.limit.value,
        dim=e.loaded.hidden_size if e.task_name == "embed" else None,
        prompts=e.loaded.st.prompts if e.loaded.st and e.task_name in ("embed", "sparse")
        else None,
        default_prompt_name=e.loaded.st.default_prompt_name if e.loaded.st else None,
        labels=getattr(e.task, "labels", None) if e.task_name == "classify" else None,
        gate_passed=report.passed if report else None,
        gate_overridden=bool(report and report.overridden),
        packed_batches=slot.batcher.packed if slot.batcher else None,
        forward_workers=slot.batcher.workers if slot.batcher else None,
        precision=e.loaded.precision,
        quantization_evaluated=e.loaded.quantization.evaluated if e.loaded.quantization
        else None, warnings=list(e.loaded.warnings),
        decode_path=e.generation.decode_path() if e.generation is not None else None,
        decode_kernel=e.generation.kernel.to_dict() if e.generation is not None else None,
        packed_linear=e.packing.to_dict(),
        drift=e.watch.info() if e.watch is not None else None)
