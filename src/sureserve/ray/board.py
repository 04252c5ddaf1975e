"""One view of every Ray Serve replica: ``/health`` and ``/metrics`` answered by any of them.

Ray's proxy hands each request to one replica, so a replica's own ``/health`` and
``/metrics`` would speak for itself only. Each replica therefore reports to a small Ray
actor, the board, once a second: its state (loading / ready / failed, with the reason),
its drift alerts and its rendered ``sureserve_*`` metrics. Whichever replica answers
``/health`` or ``/metrics`` reads the board and answers for all of them: the health body
lists every replica, and every metric sample carries a ``replica`` label. A replica that
stops reporting (its process died) is shown as ``lost`` until Ray has replaced it.

The pure parts (``combine_health``, ``relabel``) take plain data and are tested without
Ray; ``Board`` and ``Reporter`` are the Ray actor and the replica's side of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger("sureserve.ray")

REPORT_EVERY = 1.0  # seconds between a replica's reports
LOST_AFTER = 3.0  # no report for this long: the replica is shown as lost
FORGET_AFTER = 120.0  # the board drops an entry silent for this long
NAMESPACE = "sureserve"


def board_name(app: str) -> str:
    return f"{app}-replicas"


class Board:
    """The Ray actor holding the replicas' latest reports (created by ``serve_on_ray``)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, dict[str, Any], bytes]] = {}

    def report(self, replica: str, info: dict[str, Any], metrics: bytes) -> None:
        self.entries[replica] = (time.monotonic(), info, metrics)

    def forget(self, replica: str) -> None:
        self.entries.pop(replica, None)

    def view(self, with_metrics: bool = False) -> list[dict[str, Any]]:
        now = time.monotonic()
        for k in [k for k, (t, _, _) in self.entries.items() if now - t > FORGET_AFTER]:
            del self.entries[k]
        return [{**info, "age_s": round(now - t, 2),
                 **({"metrics": m} if with_metrics else {})}
                for t, info, m in self.entries.values()]


# --- pure: what /health and /metrics answer from the board's entries --------------------

def combine_health(entries: list[dict[str, Any]], deployed: int | None,
                   drift_unhealthy: bool) -> tuple[dict[str, Any], int]:
    """The health body for every replica, and its HTTP status.

    ``entries``: the board's view (one dict per replica: replica, pid, node, status,
    models, reason, drift, age_s). ``deployed``: how many replicas Ray Serve has now
    (running or starting), None when unknown; a silent replica is shown as lost until as
    many replicas report again (Ray replaced it). 200 while at least one replica is
    ready (the service answers), unless a drift alert is on with ``drift_unhealthy``."""
    fresh = [e for e in entries if e["age_s"] <= LOST_AFTER]
    lost = [e for e in entries if e["age_s"] > LOST_AFTER]
    if deployed is not None and len(fresh) >= deployed:
        lost = []
    replicas = [_replica(e, "lost" if e in lost else e["status"]) for e in fresh + lost]
    replicas.sort(key=lambda r: r["replica"])
    ready = [r for r in replicas if r["status"] == "ready"]
    drift = [d for e in fresh for d in e.get("drift", [])]
    if not replicas:
        status = "loading"
    elif ready:
        status = "ok" if len(ready) == len(replicas) and not drift else "degraded"
    elif any(r["status"] == "loading" for r in replicas):
        status = "loading"
    else:
        status = "failed"
    models: dict[str, str] = {}
    rank = {"ready": 3, "loading": 2, "failed": 1}
    for e in fresh:
        for name, state in e["models"].items():
            if rank.get(state, 0) > rank.get(models.get(name, ""), 0):
                models[name] = state
    reasons = [f"{r['replica']}: {r['reason']}" for r in replicas if r["reason"]]
    body = {"status": status, "models": models, "reason": "; ".join(reasons) or None,
            "drift": drift, "replicas": replicas}
    healthy = bool(ready) and not (drift and drift_unhealthy)
    return body, 200 if healthy else 503


def _replica(e: Mapping[str, Any], status: str) -> dict[str, Any]:
    reason = e.get("reason")
    if status == "lost":
        reason = (f"no report for {e['age_s']:.0f} s: its process stopped (Ray restarts "
                  "replicas that die)")
    return {"replica": e["replica"], "pid": e["pid"], "node": e["node"], "status": status,
            "models": dict(e["models"]), "reason": reason,
            "seconds_since_report": e["age_s"]}


def relabel(pages: Iterable[tuple[str, bytes]]) -> bytes:
    """Several replicas' /metrics pages as one, each sample labelled with its replica.

    Families keep one HELP/TYPE header; samples of every replica follow it, so a
    Prometheus scrape of any replica sees the whole deployment and can sum or split by
    ``replica``."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, page in pages:
        for fam in text_string_to_metric_families(page.decode()):
            into = families.get(fam.name)
            if into is None:
                into = families[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                   fam.unit)
            into.samples.extend(s._replace(labels={**s.labels, "replica": replica})
                                for s in fam.samples)

    class _Pages:
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Pages())
    return generate_latest(registry)


# --- the replica's side ---------------------------------------------------------------------

class Reporter:
    """Runs in each replica (``create_app(cluster=...)``): reports to the board, and
    answers ``/health`` and ``/metrics`` from it."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.board: Any = None
        self.replica = f"pid{os.getpid()}"
        self.node = "?"

    async def start(self, state: Any) -> None:
        """Find the board and report a first time (the replica is loading)."""
        await asyncio.to_thread(self._connect)
        await self.report(state)

    def _connect(self) -> None:
        import ray
        from ray import serve

        self.board = ray.get_actor(board_name(self.app), namespace=NAMESPACE)
        # outside a replica (the app on its own): the pid names it
        with contextlib.suppress(Exception):
            self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()[:12]

    def info(self, state: Any) -> dict[str, Any]:
        status = state.status
        reasons = [f"{s.name}: {s.reason}" for s in state.slots.values() if s.reason]
        return {"replica": self.replica, "pid": os.getpid(), "node": self.node,
                "status": {"ok": "ready", "degraded": "ready"}.get(status, status),
                "models": {s.name: s.state for s in state.slots.values()},
                "reason": "; ".join(reasons) or None, "drift": state.drift_alerts(),
                "failures": sorted({s.failure for s in state.slots.values() if s.failure})}

    async def report(self, state: Any) -> None:
        from prometheus_client import generate_latest

        state.refresh_gauges()
        await self.board.report.remote(self.replica, self.info(state),
                                       generate_latest(state.metrics.registry))

    async def run(self, state: Any) -> None:
        """Report every REPORT_EVERY seconds until cancelled; a report that fails is
        retried on the next beat."""
        while True:
            await asyncio.sleep(REPORT_EVERY)
            try:
                await self.report(state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not report to the replica board: %s", exc)

    async def leave(self) -> None:
        """A replica stopped on purpose (scale-down, shutdown) is not 'lost'."""
        if self.board is not None:
            with contextlib.suppress(Exception):
                await self.board.forget.remote(self.replica)

    async def health(self, state: Any) -> tuple[dict[str, Any], int]:
        await self.report(state)  # this replica's own entry is current
        entries, deployed = await asyncio.gather(self.board.view.remote(),
                                                 asyncio.to_thread(_deployed, self.app))
        return combine_health(entries, deployed, state.settings.drift_unhealthy)

    async def metrics(self, state: Any) -> bytes:
        await self.report(state)
        entries = await self.board.view.remote(True)
        pages = [(e["replica"], e["metrics"]) for e in entries if e["age_s"] <= LOST_AFTER]
        return await asyncio.to_thread(relabel, pages)


def _deployed(app: str) -> int | None:
    """Replicas Ray Serve has for the app now, whatever their state; None if unknown."""
    try:
        from ray import serve

        dep = serve.status().applications[app].deployments[app]
        return sum(dep.replica_states.values())
    except Exception:
        return None
