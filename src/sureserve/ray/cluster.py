"""Connecting to Ray: a cluster the user names (``--ray-address``), or a local one started
here with every component on the loopback address.

On these machines no traffic may go to any address but 127.0.0.1, the machine's own private
one included; Ray picks the machine's private address as its node address unless it is
told it runs a single-machine cluster, which the variables below do (they must be set
before Ray is imported, since Ray reads them once). The usage-stats report Ray sends to
its authors is off too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("sureserve.ray")
LOOPBACK = "127.0.0.1"
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address: loopback, not the LAN one
    "RAY_USAGE_STATS_ENABLED": "0",  # no report to Ray's authors
}


def _local_env() -> None:
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    import ray._private.ray_constants as constants

    # when Ray was imported before these were set, the constant was read already
    constants.ENABLE_RAY_CLUSTER = False


def start_local(num_cpus: int | None = None, runtime_env: dict[str, Any] | None = None
                ) -> None:
    """Start a local Ray instance in this process bound to 127.0.0.1 (no dashboard)."""
    _local_env()
    import ray

    # address="local": a new instance even when another runs on this machine (plain
    # ray.init() would join one it finds). No idle workers started ahead of need: on a small
    # machine they compete for the CPUs with what starts first (Serve's controller and
    # proxy, the first actors), and every actor here loads a model, so a pre-started worker
    # saves it little: measured on 2 cores, a `serve --ray` deployment ready in 13.2 s
    # instead of 14.7-16.0, the Ray Data tests 62.9 s instead of 66.3
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             _node_ip_address=LOOPBACK, log_to_driver=False, configure_logging=False,
             runtime_env=runtime_env,
             _system_config={"enable_worker_prestart": False,
                             "prestart_worker_first_driver": False})
    log.info("started a local Ray instance at %s", ray.get_runtime_context().gcs_address)


def ensure(address: str | None, runtime_env: dict[str, Any] | None = None) -> bool:
    """Connected from now on to the cluster at ``address`` (None: a local instance started
    here). Returns whether this call connected; False when already connected (an
    embedding program, the tests), which is used as is. APIs returning a lazy Dataset
    leave the connection to the caller (``ray.shutdown()`` ends it)."""
    if address is None or _loopback(address):
        _local_env()
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        start_local(runtime_env=runtime_env)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False,
                 runtime_env=runtime_env)
    return True


@contextlib.contextmanager
def connected(address: str | None, runtime_env: dict[str, Any] | None = None
              ) -> Iterator[None]:
    """``ensure``, disconnected at the end (a local instance started here is shut down)."""
    joined = ensure(address, runtime_env)  # before importing Ray: it sets what Ray reads at import
    try:
        yield
    finally:
        if joined:
            import ray

            ray.shutdown()


def _loopback(address: str) -> bool:
    """A cluster on this machine's loopback (its node address is 127.0.0.1 too)."""
    return address.split("://")[-1].split(":")[0] in (LOOPBACK, "localhost")


def cpu_share(cluster: dict[str, float], replicas: int) -> int:
    """CPUs each of ``replicas`` Ray Data actors or Ray Serve replicas asks for: an equal
    share of the cluster's, at least one (decided here for both)."""
    return max(1, int(cluster.get("CPU", 1)) // max(1, replicas))
