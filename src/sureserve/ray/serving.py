"""``sureserve serve MODEL... --ray --replicas N``: the same HTTP app, as Ray Serve replicas.

Each replica builds the very app ``sureserve serve`` runs (``create_app``: routes, request
and answer shapes, auth, limits, errors, gate, warm-up, its own batcher), from a builder
evaluated in the replica, so its lifespan loads and gates the models there. Ray Serve's
proxy listens on ``--host``/``--port`` (127.0.0.1 by default) and spreads requests over
the replicas. Backpressure stays sureserve's: a replica takes up to ``max_queue_inputs``
requests at once and its own queue answers 429 with Retry-After beyond that.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

from sureserve.settings import Settings

log = logging.getLogger("sureserve.ray")
APP = "sureserve"


def deployment(names: Sequence[str], settings: Settings, replicas: int, cpus: float) -> Any:
    """The Serve application: ``replicas`` copies of sureserve's app."""
    from ray import serve

    names = list(names)

    def build() -> Any:  # runs in each replica
        from sureserve.server.app import create_app

        return create_app(settings, names)

    # a replica takes as many requests at once as its own queue holds, so that overload
    # is answered by sureserve's 429 (with Retry-After), not by requests parked in Serve
    dep: Any = serve.deployment(serve.ingress(build)(), name=APP, num_replicas=replicas,
                                max_ongoing_requests=settings.max_queue_inputs,
                                ray_actor_options={"num_cpus": cpus})
    return dep.bind()


def serve_on_ray(names: Sequence[str], settings: Settings, replicas: int,
                 address: str | None) -> None:
    """Deploy and wait for SIGTERM or Ctrl-C; then take the deployment down (and the local
    Ray instance, when this command started it)."""
    import ray
    from ray import serve

    from sureserve.ray.cluster import connected

    stop = threading.Event()
    with connected(address):
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own
            signal.signal(sig, lambda *_: stop.set())
        cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)) // replicas)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(deployment(names, settings, replicas, cpus), name=APP, route_prefix="/",
                  blocking=False)
        log.warning("Ray Serve: %d replica(s) of %s on http://%s:%d", replicas,
                    ", ".join(names), settings.host, settings.port)
        try:
            stop.wait()
        finally:
            serve.shutdown()
