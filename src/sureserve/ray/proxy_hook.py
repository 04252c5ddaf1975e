"""A 503 that says so when the replica answering a request dies under it.

Ray Serve's HTTP proxy (2.60) answers a request whose replica process died mid-request
with a bare ``500 Internal Server Error``: to the client that reads like a bug in the
model, and retry logic keyed on 5xx semantics treats it as permanent. The proxy no longer
takes ASGI middlewares, so this hook, which Ray runs in each of the job's worker processes
(``runtime_env={"worker_process_setup_hook": ...}``, set by ``sureserve serve --ray``),
changes the proxy's mapping of that one failure (``RayActorError``) to a 503 with
``Retry-After`` and a body in sureserve's error shape. Every other answer is Ray's own.
Guarded: if Ray's internals move (another Ray version), nothing is changed and a lost
replica's requests get Ray's 500 again.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("sureserve.ray")
HOOK = "sureserve.ray.proxy_hook.setup"
BODY = {"error": "the replica answering this request stopped before it answered (its "
        "process died); Ray Serve is starting a new one",
        "error_type": "replica_lost",
        "fix": "retry the request: the other replicas are answering"}


def setup() -> None:
    try:
        from ray.exceptions import RayActorError
        from ray.serve._private import proxy
        from ray.serve._private.http_util import retry_after_headers
        from ray.serve._private.proxy_request_response import ResponseStatus
        original = proxy.get_http_response_status
    except (ImportError, AttributeError):  # not the Ray this was written for
        return
    if getattr(original, "sureserve", False):
        return

    def status(exc: BaseException, request_timeout_s: Any, request_id: str) -> Any:
        if isinstance(exc, RayActorError):
            return ResponseStatus(code=503, is_error=True, message=BODY,  # type: ignore[arg-type]
                                  headers=retry_after_headers(1))
        return original(exc, request_timeout_s, request_id)

    status.sureserve = True  # type: ignore[attr-defined]
    proxy.get_http_response_status = status
