"""Two corrections to Ray Serve 2.60, run in each of the job's worker processes.

``sureserve serve --ray`` sets ``runtime_env={"worker_process_setup_hook": HOOK}``, so Ray
runs ``setup`` in every worker of the job (proxy, replicas) before any of Ray's code:

- **A 503 that says so when a replica dies under a request.** Ray's HTTP proxy answers a
  request whose replica process died mid-request with a bare ``500 Internal Server
  Error``: to the client that reads like a bug in the model, and retry logic keyed on 5xx
  semantics treats it as permanent. The proxy no longer takes ASGI middlewares, so its
  mapping of that one failure (``RayActorError``) is changed to a 503 with
  ``Retry-After`` and a body in sureserve's error shape. Every other answer is Ray's own.
- **Replicas listen on the node's address, not on every interface.** Each replica starts
  a gRPC server for calls between deployments on ``[::]:0`` (all addresses), whatever the
  node address; on a cluster whose node address is the loopback (the local one sureserve
  starts) it is bound to that address instead, so nothing listens beyond 127.0.0.1.

Both are guarded: if Ray's internals move (another Ray version), nothing is changed.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

log = logging.getLogger("sureserve.ray")
HOOK = "sureserve.ray.hooks.setup"
BODY = {"error": "the replica answering this request stopped before it answered (its "
        "process died); Ray Serve is starting a new one",
        "error_type": "replica_lost",
        "fix": "retry the request: the other replicas are answering"}


def setup() -> None:
    _replica_lost_is_503()
    _replica_grpc_on_node_address()


def _replica_lost_is_503() -> None:
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


def _replica_grpc_on_node_address() -> None:
    try:
        import ray._private.worker as worker
        from ray.serve._private import replica
        node = worker.global_worker.node_ip_address
        original = replica.add_port_to_grpc_server
    except (ImportError, AttributeError):
        return
    if not node or not ipaddress.ip_address(node).is_loopback \
            or getattr(original, "sureserve", False):
        return

    def add_port(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = f"{node}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port.sureserve = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
