"""Start real servers on loopback for the HTTP tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@pytest.fixture(scope="session")
def keyed_server() -> Iterator[Server]:
    s = start_server(["minilm"], {"SURESERVE_API_KEY": "s3cret"})
    yield s
    stop_server(s)
