"""``sureserve serve MODEL... --ray --replicas N``: the same HTTP app, as Ray Serve replicas.

Each replica builds the very app ``sureserve serve`` runs (``create_app``: routes, request
and answer shapes, auth, limits, errors, gate, warm-up, its own batcher), from a builder
evaluated in the replica. Its start-up loads and gates the models before Ray routes it any
traffic; a replica whose model fails to load is restarted by Ray, and a deployment whose
replicas all fail ends the command with the replicas' reasons. A failed gate ends it at
the first replica that reports one (exit 3): the verdict would be the same in every retry.

Ray Serve's proxy listens on ``--host``/``--port`` (127.0.0.1 by default). Every replica
reports to a board actor (``board.py``) so ``/health`` lists every replica and ``/metrics``
carries every replica's metrics with a ``replica`` label, whichever replica answers.

Backpressure: a replica takes ``max_queue_inputs`` requests at once (its own queue answers
429 when their inputs overflow it); when every replica is full, Ray's proxy holds up to
``ray_max_queued_requests`` and answers the rest 429 with Retry-After. A request whose
replica dies under it is answered 503 (``hooks.py``), not Ray's bare 500.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

from sureserve.errors import GateError, SettingsError, SureserveError
from sureserve.settings import Settings

log = logging.getLogger("sureserve.ray")
APP = "sureserve"


def scaling(settings: Settings, replicas: int) -> dict[str, Any]:
    """Serve's replica options: a fixed ``replicas``, or autoscaling when both
    ``ray_min_replicas`` and ``ray_max_replicas`` are set."""
    lo, hi = settings.ray_min_replicas, settings.ray_max_replicas
    if lo is None and hi is None:
        return {"num_replicas": replicas}
    if lo is None or hi is None or lo > hi:
        raise SettingsError(f"autoscaling needs both bounds, min <= max (got min={lo}, "
                            f"max={hi})", "set --ray-min-replicas and --ray-max-replicas "
                            "(SURESERVE_RAY_MIN_REPLICAS / _MAX_REPLICAS), min <= max")
    return {"num_replicas": "auto", "autoscaling_config": {
        "min_replicas": lo, "initial_replicas": lo, "max_replicas": hi,
        "target_ongoing_requests": settings.ray_target_ongoing_requests,
        "upscale_delay_s": settings.ray_upscale_delay_s,
        "downscale_delay_s": settings.ray_downscale_delay_s}}


def resources(settings: Settings, cluster: dict[str, float], most: int) -> dict[str, float]:
    """A replica's share of the cluster: CPUs split over the most replicas it may run, and
    one GPU each when the load plan asks for CUDA (``--device cuda``, or no device given
    and the cluster has GPUs), as the local load plan would pick it."""
    from sureserve.ray.cluster import cpu_share

    cpus = float(cpu_share(cluster, most))
    device = (settings.device or "").split(":")[0]
    gpus = cluster.get("GPU", 0.0)
    if device == "cuda" and not gpus:
        raise SettingsError("--device cuda, but the Ray cluster has no GPU",
                            "start the Ray nodes on GPU machines, or drop --device")
    wants_gpu = device == "cuda" or (not device and gpus > 0)
    return {"num_cpus": cpus, **({"num_gpus": 1.0} if wants_gpu else {})}


def deployment(names: Sequence[str], settings: Settings, replicas: int,
               actor_options: dict[str, Any]) -> Any:
    """The Serve application: copies of sureserve's app, each reporting to the board."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    names = list(names)

    def build() -> Any:  # runs in each replica
        from sureserve.ray.board import Reporter
        from sureserve.server.app import create_app

        return create_app(settings, names, cluster=Reporter(APP))

    dep: Any = serve.deployment(
        serve.ingress(build)(), name=APP, **scaling(settings, replicas),
        max_ongoing_requests=settings.max_queue_inputs,
        max_queued_requests=settings.ray_max_queued_requests,
        health_check_period_s=settings.ray_health_check_period_s,
        # how often a stopping replica looks whether its requests in flight are done (Serve's
        # default, 2 s, kept an idle replica 2 s at every stop or downscale)
        graceful_shutdown_wait_loop_s=0.5,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        ray_actor_options=actor_options)
    return dep.bind()


def serve_on_ray(names: Sequence[str], settings: Settings) -> None:
    """Deploy (``settings.replicas`` replicas, or autoscaling; on ``settings.ray_address``
    or a local Ray) and wait for SIGTERM or Ctrl-C; then take the deployment down (and the
    local Ray instance, when this command started it)."""
    replicas, address = settings.replicas, settings.ray_address
    import ray
    from ray import serve

    from sureserve.ray.board import NAMESPACE, Board, board_name
    from sureserve.ray.cluster import connected
    from sureserve.ray.hooks import HOOK

    opts = scaling(settings, replicas)  # a usage error before Ray starts
    most = settings.ray_max_replicas if "autoscaling_config" in opts else replicas
    stop = threading.Event()
    with connected(address, {"worker_process_setup_hook": HOOK}):
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own
            signal.signal(sig, lambda *_: stop.set())
        actor_options = resources(settings, ray.cluster_resources(), most or replicas)
        board: Any = ray.remote(Board).options(
            name=board_name(APP), namespace=NAMESPACE, num_cpus=0,
            get_if_exists=True).remote()
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run_many([serve.RunTarget(deployment(names, settings, replicas,
                                                       actor_options), name=APP,
                                            route_prefix="/")],
                           wait_for_ingress_deployment_creation=False,
                           wait_for_applications_running=False)
            if _until_running(board, stop):
                log.warning("Ray Serve: %s replica(s) of %s on http://%s:%d, %s",
                            opts["num_replicas"], ", ".join(names), settings.host,
                            settings.port, actor_options)
                stop.wait()
        finally:
            serve.shutdown()


def _until_running(board: Any, stop: threading.Event) -> bool:
    """Wait for the application to run (True) or for a stop signal (False). A failed gate
    ends the wait at the first replica that reports it: the gate's verdict is the same in
    every replica (same model, settings and machine), so Serve's constructor retries (three
    per replica) would only repeat it. Other start-up failures (out of memory, a file that
    cannot be read) keep Serve's retries, and end the wait when Serve gives up."""
    import ray
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    while not stop.wait(0.5):
        entries = ray.get(board.view.remote())
        if any("gate_failed" in e.get("failures", []) for e in entries):
            raise _deploy_failed(entries, RuntimeError("the gate failed"))
        app = serve.status().applications.get(APP)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return True
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise _deploy_failed(entries, RuntimeError(app.message or "deploy failed"))
    return False


def _deploy_failed(entries: list[dict[str, Any]], exc: Exception) -> SureserveError:
    """Why no replica came up, from what the replicas reported before they failed."""
    reasons = sorted({e["reason"] for e in entries if e.get("reason")})
    codes = {c for e in entries for c in e.get("failures", [])}
    message = "no Ray Serve replica could start: " + ("; ".join(reasons) or str(exc))
    if "gate_failed" in codes:
        return GateError(message, "run 'sureserve check MODEL' for the gate's report")
    return SureserveError(message, "the replicas' logs are in /tmp/ray/session_latest/logs/"
                          "serve/")
