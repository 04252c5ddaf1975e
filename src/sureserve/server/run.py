"""Run the server process: its environment, uvicorn, a clean exit after a graceful drain."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Sequence

import uvicorn

from sureserve.settings import Settings


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM once it has drained, so the process dies "by signal"
        # (status 143). A drained shutdown is a success: handle the signals, exit 0.
        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def serve(models: Sequence[str], settings: Settings) -> None:
    """Serve ``models`` until SIGTERM or SIGINT (exit 0 after the drain)."""
    # OpenMP threads busy-wait after each parallel region by default; on a small machine
    # that spinning starves the event loop that parses and tokenizes the next requests
    # (BENCHMARKS.md). But a decode step is ~200 matmuls of a few microseconds each, and
    # with passive waiting each one pays a thread wake-up: generation measured 17 vs 29
    # tok/s. So passive only when no generation model is served. Must be set before torch
    # loads its OpenMP runtime; an explicit user setting wins.
    if not any(_generates(m, settings) for m in models):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # start-up decisions (workers and threads, measured pass cost, packing on or off and
    # why, gate summary) are worth a line each; nothing is logged per request at INFO
    logging.getLogger("sureserve.server").setLevel(logging.INFO)
    from sureserve.server.app import create_app

    config = uvicorn.Config(create_app(settings, models), host=settings.host,
                            port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=30)
    _Server(config).run()


def _generates(model: str, settings: Settings) -> bool:
    """Whether ``model`` will be served for generation, from its config alone (no torch
    yet); an identifier that does not resolve is left to the loader to report."""
    import json

    from sureserve.loading.inspect import head_kind
    from sureserve.loading.source import resolve

    try:
        path = resolve(model, settings=settings).path
        return head_kind(json.loads((path / "config.json").read_text())) == "generate"
    except Exception:  # the loader says what is wrong, with the fix, at start-up
        return False
