"""The text-embeddings-inference route set and the Hugging Face inference payload.

``huggingface_hub.InferenceClient`` pointed at a server posts to its base URL, with the
options either at the top level (``feature_extraction``) or in a ``parameters`` object
(``text_classification``); SageMaker posts to ``/invocations``. TEI answers those with the
default model's task; so does this module, with one rule TEI lacks: an option that would
change the answer is honoured or refused with 422 naming it, never dropped (TEI's
deserializer ignores unknown fields, so a client's ``normalize: false`` can vanish there).

Response shapes: TEI's, except that a classification request that came with a
``parameters`` object (the inference-API convention) gets one list of labels per input
even for a single string, which is what that convention's clients parse.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, TypeAdapter, ValidationError

from sureserve.errors import InputError, InputTooLongError
from sureserve.server import schemas as S
from sureserve.server.batcher import requested
from sureserve.server.http import ERRORS, OPENAI_ERRORS, health_response, until_done_or_gone
from sureserve.server.state import ServerState

_VECTORS = TypeAdapter(list[list[float]])
_INT_VECTORS = TypeAdapter(list[list[int]])
_TERMS = TypeAdapter(list[list[dict[str, Any]]])
#: request fields that are the payload or the routing, not options
_NOT_OPTIONS = {"inputs", "model", "parameters", "query", "texts", "queries"}


def options(body: BaseModel, route: str) -> dict[str, Any]:
    """The request's options, merged from the top level and ``parameters`` (null: not set).

    The options a route understands are its request schema's own fields (one owner: the
    schema), each also accepted inside ``parameters`` as TEI's clients send them. A key in
    ``parameters`` that this route does not implement is refused, naming it; a key given in
    both places with different values is refused too."""
    known = tuple(k for k in type(body).model_fields if k not in _NOT_OPTIONS)
    params = getattr(body, "parameters", None) or {}
    unknown = sorted(k for k, v in params.items() if k not in known and v is not None)
    if unknown:
        raise InputError(f"parameters {', '.join(repr(k) for k in unknown)} are not "
                         f"supported by {route}", f"remove them; {route} understands "
                         f"{', '.join(known)}")
    out: dict[str, Any] = {}
    for key in known:
        top = getattr(body, key) if key in body.model_fields_set else None
        inner = params.get(key)
        if inner is not None:  # typed as the top-level field of the same name
            try:
                kind: Any = type(body).model_fields[key].annotation
                inner = TypeAdapter(kind).validate_python(inner, strict=True)
            except ValidationError as exc:
                raise InputError(f"parameters.{key}: {exc.errors()[0]['msg']}",
                                 "send it with the type of the top-level field of that "
                                 "name (see /docs)") from exc
        if top is not None and inner is not None and top != inner:
            raise InputError(f"{key} is {top!r} at the top level and {inner!r} in "
                             "parameters", "send it once")
        value = inner if inner is not None else top
        if value is not None:
            out[key] = value
    return out


def cut(opts: dict[str, Any]) -> dict[str, Any]:
    """The request's text-side arguments for ``Batcher.infer``: its truncation policy, the
    end a cut takes tokens from, and its prompt."""
    return {"truncation": requested(opts.get("truncate")),
            "direction": str(opts.get("truncation_direction") or "right").lower(),
            "prompt_name": opts.get("prompt_name")}


async def embed(state: ServerState, body: S.EmbedRequest, request: Request) -> Response:
    opts = options(body, "/embed")
    batcher = state.batcher(body.model, "embed")
    form = vector_form(batcher.engine, opts.get("dimensions"), opts.get("embed_dtype"))
    texts = state.validate(body.inputs, engine=batcher.engine)
    work = batcher.infer(texts, **cut(opts), normalize=opts.get("normalize", True), **form)
    vecs = (await until_done_or_gone(request, work)).outputs
    # the hottest route: serialise straight from the numbers (cheaper than validating them
    # against response_model first, which only documents the shape)
    adapter = _VECTORS if vecs.dtype.kind == "f" else _INT_VECTORS
    return Response(adapter.dump_json(vecs.tolist()), media_type="application/json")


def vector_form(engine: Any, dimensions: int | None, dtype: str | None) -> dict[str, Any]:
    """``dimensions`` and ``precision`` for ``Engine.finish``, refused before any work
    when the model neither declares nor was measured for them (``vectors.Allowed``)."""
    engine.check_vectors(dimensions, dtype)
    if dimensions is None and dtype in (None, "float32"):
        return {}
    return {"dimensions": dimensions, "precision": dtype}


async def embed_sparse(state: ServerState, body: S.EmbedSparseRequest,
                       request: Request) -> Response:
    opts = options(body, "/embed_sparse")
    batcher = state.batcher(body.model, "sparse")
    top_k = opts.get("top_k")
    if top_k is not None and top_k < 0:  # inside parameters, where the schema's bound is not
        raise InputError(f"top_k is {top_k}", "send 0 (every term) or more, or leave it out")
    texts = state.validate(body.inputs, engine=batcher.engine)
    work = batcher.infer(texts, **cut(opts),
                         top_k=batcher.engine.settings.sparse_top_k if top_k is None else top_k,
                         tokens=opts.get("return_tokens", False))
    terms = (await until_done_or_gone(request, work)).outputs
    return Response(_TERMS.dump_json(terms), media_type="application/json")


async def predict(state: ServerState, body: S.PredictRequest, request: Request) -> Any:
    opts = options(body, "/predict")
    batcher = state.batcher(body.model, "classify")
    fn = opts.get("function_to_apply")
    if fn is not None and opts.get("raw_scores"):
        raise InputError("raw_scores and function_to_apply both given",
                         "send one: function_to_apply 'none' means raw scores")
    top_k = opts.get("top_k")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k is {top_k}", "send a positive top_k, or leave it out")
    work = batcher.infer(state.validate(body.inputs, engine=batcher.engine), **cut(opts),
                         top_k=None, raw_scores=opts.get("raw_scores", False) or fn is not None)
    results = (await until_done_or_gone(request, work)).outputs
    if fn is not None:
        results = [_transformed(r, fn) for r in results]
    if top_k is not None:
        results = [r[:top_k] for r in results]
    if isinstance(body.inputs, str) and body.parameters is None:
        return results[0]
    return results


def _transformed(ranked: list[dict[str, Any]], fn: str) -> list[dict[str, Any]]:
    """Labels re-scored from their logits by ``function_to_apply``, best first."""
    logits = np.array([d["score"] for d in ranked], dtype=np.float64)
    if fn == "softmax":
        e = np.exp(logits - logits.max())
        scores = e / e.sum()
    elif fn == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = logits
    out = [{**d, "score": float(s)} for d, s in zip(ranked, scores, strict=True)]
    return sorted(out, key=lambda d: -d["score"])


async def similarity(state: ServerState, body: S.SimilarityRequest,
                     request: Request) -> list[float]:
    opts = options(body, "/similarity")
    batcher = state.batcher(body.model, "embed")
    texts = state.validate([body.inputs.source_sentence, *body.inputs.sentences],
                           engine=batcher.engine)
    work = batcher.infer(texts, **cut(opts), normalize=True)
    out = await until_done_or_gone(request, work)
    vecs = np.asarray(out.outputs, dtype=np.float64)
    return [float(x) for x in vecs[1:] @ vecs[0]]


async def embed_all(state: ServerState, body: S.EmbedAllRequest,
                    request: Request) -> list[list[list[float]]]:
    """Token-level hidden states per input (TEI ``/embed_all``): no pooling, no padding."""
    opts = options(body, "/embed_all")
    batcher = state.batcher(body.model, "embed")
    texts = state.validate(body.inputs, engine=batcher.engine)
    states = await until_done_or_gone(request, batcher.token_states(texts, **cut(opts)))
    return [s.tolist() for s in states]


async def rerank(state: ServerState, body: S.RerankRequest, request: Request) -> list[Any]:
    from sureserve.tasks.rerank import ranked_groups

    opts = options(body, "/rerank")
    batcher = state.batcher(body.model, "rerank")
    single = body.query is not None or body.texts is not None
    if single == (body.queries is not None) or \
            (single and (body.query is None or body.texts is None)):
        raise InputError("send either query and texts, or queries (a list of {query, "
                         "texts}) for several rankings at once", "see /docs for both shapes")
    if body.queries is None:
        assert body.query is not None and body.texts is not None
        groups = [S.RerankGroup(query=body.query, texts=body.texts)]
    else:
        groups = body.queries
        if not groups:
            raise InputError("queries is empty", "send at least one {query, texts}")
    texts = state.validate([t for g in groups for t in g.texts], "texts", batcher.engine)
    queries = [g.query for g in groups for _ in g.texts]
    work = batcher.infer(texts, **cut(opts), query=body.query if body.queries is None
                         else queries, raw_scores=body.raw_scores)
    out = await until_done_or_gone(request, work)
    flags = out.summary.flags if out.summary.policy != "error" else None
    rankings = ranked_groups(out.outputs, [g.texts for g in groups], None, body.return_text,
                             flags)
    return rankings[0] if body.queries is None else rankings


async def v1_rerank(state: ServerState, body: S.V1RerankRequest,
                    request: Request) -> S.V1RerankResponse:
    from sureserve.tasks.rerank import ranked

    batcher = state.batcher(body.model, "rerank")
    docs = [d if isinstance(d, str) else d.text for d in body.documents]
    texts = state.validate(docs, "documents", batcher.engine)
    policy = state.settings.v1_rerank_truncation
    try:
        out = await until_done_or_gone(request, batcher.infer(
            texts, policy, query=body.query, max_text_tokens=body.max_tokens_per_doc))
    except InputTooLongError as exc:
        raise InputTooLongError(
            exc.message.replace("text ", "document ", 1),
            "send max_tokens_per_doc to cut documents to a size the model reads, or start "
            "the server with --v1-rerank-truncation chunk (each document scored as its best "
            "chunk) or truncate (SURESERVE_V1_RERANK_TRUNCATION)", index=exc.index,
            length=exc.length, limit=exc.limit) from exc
    results = [S.V1RerankResult(index=r["index"], relevance_score=r["score"],
                                document=S.DocumentText(text=texts[r["index"]])
                                if body.return_documents else None)
               for r in ranked(out.outputs, texts, body.top_n)]
    s = out.summary
    limit = f"the model's limit of {s.limit} tokens per (query, document) pair"
    cap = f"max_tokens_per_doc={body.max_tokens_per_doc} or " if body.max_tokens_per_doc \
        else ""
    warnings = [f"document {i} was truncated to fit {cap}{limit}" for i in s.truncated]
    warnings += [f"document {i} is over {limit}: scored as the best of its {n} chunks"
                 for i, n in sorted(s.chunked.items())]
    return S.V1RerankResponse(model=batcher.name, results=results,
                              usage=S.RerankUsage(total_tokens=s.real_tokens),
                              meta=S.RerankMeta(warnings=warnings))


async def decode(state: ServerState, body: S.DecodeRequest) -> list[str]:
    _, engine = state.pick(body.model, None)
    tok = engine.tokenizer
    rows: list[list[int]] = [body.ids] if body.ids and isinstance(body.ids[0], int) \
        else body.ids  # type: ignore[assignment]
    state.within_client_batch(len(rows), f"{len(rows)} id lists in one request")
    size = len(tok)
    for i, row in enumerate(rows):
        bad = [x for x in row if not 0 <= x < size]
        if bad:
            raise InputError(f"ids list {i} holds {bad[0]}, outside the vocabulary (0 to "
                             f"{size - 1})", "send ids the model's tokenizer produced")
    return [tok.decode(row, skip_special_tokens=body.skip_special_tokens) for row in rows]


def install_tei_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/embed", response_model=list[list[float]], responses=ERRORS)
    async def embed_route(body: S.EmbedRequest, request: Request) -> Response:
        return await embed(state, body, request)

    @app.post("/embed_sparse", response_model=list[list[S.SparseValue]],
              response_model_exclude_none=True, responses=ERRORS)
    async def embed_sparse_route(body: S.EmbedSparseRequest, request: Request) -> Response:
        """Sparse (SPLADE) vectors: each text's non-zero terms, strongest first."""
        return await embed_sparse(state, body, request)

    @app.post("/predict", response_model=list[S.Prediction] | list[list[S.Prediction]],
              response_model_exclude_none=True, responses=ERRORS)
    async def predict_route(body: S.PredictRequest, request: Request) -> Any:
        return await predict(state, body, request)

    @app.post("/similarity", response_model=list[float], responses=ERRORS)
    async def similarity_route(body: S.SimilarityRequest, request: Request) -> list[float]:
        """Cosine similarity of ``source_sentence`` to each of ``sentences``."""
        return await similarity(state, body, request)

    @app.post("/embed_all", response_model=list[list[list[float]]], responses=ERRORS)
    async def embed_all_route(body: S.EmbedAllRequest,
                              request: Request) -> list[list[list[float]]]:
        return await embed_all(state, body, request)

    @app.post("/rerank", response_model=list[S.Rank] | list[list[S.Rank]],
              response_model_exclude_none=True, responses=ERRORS)
    async def rerank_route(body: S.RerankRequest, request: Request) -> list[Any]:
        """``texts`` ranked by relevance to ``query`` (a cross-encoder), best first; with
        ``queries``, one such ranking per group."""
        return await rerank(state, body, request)

    @app.post("/v1/rerank", response_model=S.V1RerankResponse,
              response_model_exclude_none=True, responses=OPENAI_ERRORS)
    async def v1_rerank_route(body: S.V1RerankRequest,
                              request: Request) -> S.V1RerankResponse:
        """Cohere/Jina-style reranking: ``documents`` by relevance to ``query``."""
        return await v1_rerank(state, body, request)

    @app.post("/decode", response_model=list[str], responses=ERRORS)
    async def decode_route(body: S.DecodeRequest) -> list[str]:
        return await decode(state, body)

    async def default_task(body: S.InferenceRequest, request: Request) -> Any:
        """The Hugging Face inference convention: the default model's task (the first
        served model, or ``model`` in the body); ``inputs`` holding ``source_sentence``
        asks for sentence similarity; a reranker takes TEI's ``{query, texts}``."""
        data = body.model_dump(exclude_unset=True)
        shape: type[BaseModel]
        if isinstance(data.get("inputs"), dict):
            task, shape = "sentence similarity", S.SimilarityRequest
        else:
            _, engine = state.pick(data.get("model") or next(iter(state.slots)), None)
            task = engine.task_name
            if task == "generate":
                raise InputError(f"POST / on a {task} model has no inference-API task here",
                                 "use /v1/completions or /v1/chat/completions")
            shapes: dict[str, type[BaseModel]] = {
                "embed": S.EmbedRequest, "classify": S.PredictRequest,
                "rerank": S.RerankRequest, "sparse": S.EmbedSparseRequest}
            shape = shapes[task]
        try:
            parsed = shape.model_validate(data)
        except ValidationError as exc:
            where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                              for e in exc.errors()[:5])
            raise InputError(f"invalid {task} request: {where}",
                             "see /docs for the request shape") from exc
        if isinstance(parsed, S.SimilarityRequest):
            return await similarity(state, parsed, request)
        if isinstance(parsed, S.EmbedRequest):
            return await embed(state, parsed, request)
        if isinstance(parsed, S.RerankRequest):
            return await rerank(state, parsed, request)
        if isinstance(parsed, S.EmbedSparseRequest):
            return await embed_sparse(state, parsed, request)
        assert isinstance(parsed, S.PredictRequest)
        return await predict(state, parsed, request)

    for path in ("/", "/invocations"):
        app.post(path, responses=ERRORS, summary="The default model's task (TEI, "
                 "Hugging Face inference API, SageMaker)",
                 response_model=list[list[float]] | list[S.Prediction]
                 | list[list[S.Prediction]] | list[float] | list[S.Rank]
                 | list[list[S.Rank]] | list[list[S.SparseValue]],
                 response_model_exclude_none=True)(default_task)

    @app.get("/ping", response_model=S.Health,
             responses={503: {"model": S.Health, "description": "Loading or failed"}})
    async def ping() -> JSONResponse:
        """Health, under the name SageMaker and TEI use."""
        return health_response(state)
