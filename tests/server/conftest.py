"""Start real servers on loopback for the HTTP tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from sureserve.bench.serve import free_port


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[str]


def start_server(models: list[str], env: dict[str, str], ready_timeout: float = 180) -> Server:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sureserve.cli", "serve", *models, "--port", str(port)],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Server(url, proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become ready")


def stop_server(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            return server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            return -9
    return int(server.proc.returncode)


LIMITS = {"SURESERVE_MAX_CLIENT_BATCH": "16", "SURESERVE_MAX_PAYLOAD_BYTES": "60000",
          "SURESERVE_MAX_QUEUE_INPUTS": "48"}


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    s = start_server(["minilm", "sentiment-demo", "rerank-demo"], LIMITS)
    yield s
    stop_server(s)


@dataclass
class LocalServer:
    """The same app as ``sureserve serve``, run by uvicorn on a thread of this test process:
    for tests of what clients see (routes, auth, shapes), where a process of its own adds
    nothing but start-up (a fresh interpreter imports torch and transformers again)."""

    url: str


@contextmanager
def serve_here(models: list[str], factory: Any = None,
               while_loading: Callable[[str], None] | None = None,
               **settings: Any) -> Iterator[LocalServer]:
    """``models`` served on loopback until the block ends (``factory``: the app's engine
    factory; ``while_loading(url)`` runs once while /health still answers 503). One forward
    worker: more would lower torch's threads for this whole test process."""
    import uvicorn

    from sureserve.server.app import create_app
    from sureserve.settings import Settings

    port = free_port()
    app = create_app(Settings(**{"forward_workers": 1, **settings}), models,
                     **({"factory": factory} if factory is not None else {}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            try:
                status = httpx.get(f"{url}/health", timeout=2).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            if status == 503 and while_loading is not None:
                while_loading(url)
                while_loading = None
            time.sleep(0.2)
        yield LocalServer(url)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="session")
def keyed_server() -> Iterator[LocalServer]:
    with serve_here(["minilm"], api_key="s3cret") as s:
        yield s


@pytest.fixture(scope="session")
def cls_server() -> Iterator[LocalServer]:
    """sentiment-demo first: the default model, so POST / classifies."""
    with serve_here(["sentiment-demo", "minilm"], max_client_batch=16,
                    max_payload_bytes=60000, max_queue_inputs=48) as s:
        yield s
