"""What every route shares: the error answer in the route family's shape, the documented
error responses, and awaiting work while watching for the client to go away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from sureserve.errors import ClientGoneError, OverloadedError, SureserveError
from sureserve.server import schemas as S

T = TypeVar("T")
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


def error_response(path: str, err: SureserveError) -> JSONResponse:
    """TEI routes answer ``{"error", "error_type", "fix"}``, ``/v1`` routes OpenAI's shape."""
    headers = {}
    if isinstance(err, OverloadedError):
        headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
    if path.startswith("/v1") or path == "/embeddings":
        body: dict[str, Any] = err.openai_body()
    else:
        body = {"error": err.message, "error_type": err.code, "fix": err.fix}
    return JSONResponse(body, status_code=err.http_status, headers=headers)


async def until_done_or_gone(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (its inputs are dropped).

    The body has been read by now, so the next ASGI message can only be the disconnect:
    waiting for it costs nothing until it happens, where polling ``is_disconnected`` cost
    a wake-up per request every few tens of milliseconds."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job.done():
        return job.result()
    job.cancel()
    raise ClientGoneError("client disconnected", "nothing to do: its inputs were dropped")


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def health_response(state: Any) -> JSONResponse:
    """``/health`` (and ``/ping``): 200 when every model is ready, else 503 with why.
    A drift alert makes it "degraded", still 200 (503 with ``drift_unhealthy``)."""
    status = state.status
    reasons = [f"{s.name}: {s.reason}" for s in state.slots.values() if s.reason]
    drift = state.drift_alerts()
    body = S.Health(status=status, models={s.name: s.state for s in state.slots.values()},
                    reason="; ".join(reasons) or None,
                    drift=[S.DriftAlert(**d) for d in drift])
    healthy = status == "ok" or (status == "degraded" and not state.settings.drift_unhealthy)
    return JSONResponse(body.model_dump(exclude={"replicas"}),
                        status_code=200 if healthy else 503)
