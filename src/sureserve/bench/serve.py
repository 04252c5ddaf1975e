"""``sureserve bench serve``: closed-loop HTTP clients against the server, in one run.

For each concurrency level, that many clients each send one text per request (drawn in
order from the realistic mix) and send the next as soon as the answer arrives, for a
bounded time and count, to a server on loopback. Contenders: sureserve's server, a plain
FastAPI endpoint running a transformers pipeline per request, and, when its executable is
given, Infinity (``infinity_emb v2``, installed in a venv of its own: its pins conflict
with ours). The offline throughput of the same engine on the same texts is measured in the
same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def free_port() -> int:
    """A loopback port free now, chosen below the kernel's ephemeral range.

    Port 0 would hand out an ephemeral port, and between this check and the server's own
    bind the kernel may give the same number to an outgoing connection as its source port
    (a local Ray cluster opens many), so the server fails with "address in use". Ports
    between Ray's worker range (10002-19999) and the ephemeral range are never handed out
    that way."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(20000, max(20001, low)))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free below the range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], url: str, env: dict[str, str] | None = None
           ) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd} did not become ready")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


class Lost(ConnectionError):
    """The connection broke before a whole answer arrived."""


class _Conn:
    """One keep-alive HTTP/1.1 connection speaking just enough to POST JSON.

    The load generator shares the machine's cores with the servers it measures; httpx
    costs ~1 ms of CPU per request in Python, this ~0.1 ms, so the figures measure the
    servers rather than the client (both contenders get the same client). ``abandon``
    reads a chunked answer's first chunk and hangs up (a client leaving mid-stream); a
    ``connection: close`` answer closes it too; the next request opens a new one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, method: str = "POST",
                   abandon: bool = False) -> int:
        try:
            if self.writer is None or self.reader is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.reader, self.writer
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                         f"Content-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length, chunked, closing = 0, False, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    closing = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    if abandon:
                        closing = True
                        break
            else:
                await reader.readexactly(length)
            if closing:
                self.close()
            return status
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise Lost(str(exc)) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass(frozen=True)
class Contender:
    name: str
    cmd: list[str]  # started with --port/--host appended by ``argv``
    route: str = "/embed"
    body: Callable[[str], dict[str, Any]] = lambda t: {"inputs": t}
    env: dict[str, str] = field(default_factory=dict)
    argv: Callable[[int], list[str]] = lambda port: ["--port", str(port)]


async def _load(url: str, texts: Sequence[str], clients: int, seconds: float,
                max_requests: int, route: str = "/embed",
                body: Callable[[str], dict[str, Any]] = lambda t: {"inputs": t}
                ) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(max_requests))
    stop_at = time.perf_counter() + seconds
    host, port = url.removeprefix("http://").split(":")
    bodies = [json.dumps(body(t)).encode() for t in texts]

    async def client() -> None:
        nonlocal errors
        conn = _Conn(host, int(port))
        try:
            for i in counter:
                if time.perf_counter() > stop_at:
                    return
                t0 = time.perf_counter()
                if await conn.post(route, bodies[i % len(bodies)]) == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99)) if len(lat) else (0,) * 3
    return {"clients": clients, "requests": len(latencies), "errors": errors,
            "seconds": round(elapsed, 2), "req_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "p99_ms": round(p99, 1),
            "p99_over_p50": round(p99 / p50, 2) if p50 else None}


def _batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    total = float(re.search(r"^sureserve_batch_size_sum (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    count = float(re.search(r"^sureserve_batch_size_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return total, count


def run_serve_bench(levels: Sequence[int] = (1, 8, 32, 64), seconds: float = 10.0,
                    max_requests: int = 3000, n_texts: int = 2000, long_share: float = 0.05,
                    skip: Sequence[str] = (), out: Path | None = None,
                    log: Callable[[str], None] = print,
                    infinity: str | None = None) -> dict[str, Any]:
    import sureserve
    from sureserve.zoo.corpora import realistic_mix

    texts = realistic_mix(n_texts, long_share, seed=1)
    engine = sureserve.load("minilm", truncation="truncate")
    engine.embed(texts[:32])

    def offline_rate() -> float:
        t0 = time.perf_counter()
        engine.embed(texts)
        rate = len(texts) / (time.perf_counter() - t0)
        log(f"offline: {rate:.1f} texts/s on {len(texts)} texts")
        return rate

    offline_first = offline_rate()
    path = str(engine.loaded.source.path)
    report: dict[str, Any] = {"texts": n_texts, "long_share": long_share,
                              "seconds_per_level": seconds, "contenders": {}}
    contenders = [
        Contender("sureserve", [sys.executable, "-m", "sureserve.cli", "serve", "minilm",
                                "--truncation", "truncate"]),
        Contender("plain-fastapi-pipeline",
                  [sys.executable, "-m", "sureserve.bench.plain_server", path],
                  argv=lambda port: [str(port)]),
    ]
    if infinity:
        # Infinity's OpenAI-style route; it truncates to the model's 256 tokens as we do.
        # Offline: no hub, no telemetry; loopback like the others.
        contenders.append(Contender(
            "infinity", [infinity, "v2", "--model-id", path, "--served-model-name", "minilm",
                         "--engine", "torch", "--device", "cpu", "--log-level", "warning",
                         "--host", "127.0.0.1"],
            route="/embeddings", body=lambda t: {"input": [t], "model": "minilm"},
            env={"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
                 "INFINITY_ANONYMOUS_USAGE_STATS": "0"}))
    else:
        report["infinity"] = "not run: pass --infinity PATH to its infinity_emb executable"
    for c in contenders:
        if c.name in skip:
            continue
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start(c.cmd + c.argv(port), url, c.env)
        rows = []
        try:
            asyncio.run(_load(url, texts, 4, 2.0, 50, c.route, c.body))  # warm-up
            for clients in levels:
                before = _batch_stats(url) if c.name == "sureserve" else None
                row = asyncio.run(_load(url, texts, clients, seconds, max_requests, c.route,
                                        c.body))
                if before is not None:
                    after = _batch_stats(url)
                    row["avg_batch_size"] = round((after[0] - before[0]) /
                                                  max(after[1] - before[1], 1), 2)
                rows.append(row)
                log(f"{c.name} x{clients}: {row}")
        finally:
            _stop(proc)
        report["contenders"][c.name] = rows
    # this machine's speed drifts within minutes: offline is measured before and after
    # the servers, and the ratios use the mean of the two
    offline_last = offline_rate()
    offline = (offline_first + offline_last) / 2
    report["offline_runs_texts_per_s"] = [round(offline_first, 1), round(offline_last, 1)]
    report["offline_texts_per_s"] = round(offline, 1)
    for rows in report["contenders"].values():
        for row in rows:
            row["vs_offline"] = round(row["req_per_s"] / offline, 3)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_lag_probe(seconds: float = 15.0, big_inputs: int = 256, out: Path | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """A small request's latency while another client sends ``big_inputs``-text requests.

    One client sends one short text per request, another ``GET /health`` every 20 ms (no
    model: how soon the event loop gets to it); alone, then while a third client sends
    requests of ``big_inputs`` news articles (``"truncate": true``) back to back. What the
    big requests cost on the loop shows in ``/health`` and the loop-lag metric; the forward
    passes they share with the small request show in ``/embed``."""
    from sureserve.zoo.corpora import load_bbc

    bodies = {"embed": json.dumps({"inputs": "A quiet, well made film."}).encode(), "health":
              b"", "big": json.dumps({"inputs": [t for _, t in load_bbc()][:big_inputs],
                                      "truncate": True}).encode()}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([sys.executable, "-m", "sureserve.cli", "serve", "minilm", "--port",
                   str(port)], url)

    async def phase(kinds: tuple[str, ...]) -> dict[str, Any]:
        stop_at, lag0 = time.perf_counter() + seconds, _lag_sum(url)
        lat: dict[str, list[float]] = {k: [] for k in kinds}

        async def client(kind: str) -> None:
            conn = _Conn("127.0.0.1", port)
            for _ in range(100_000):  # bounded; the deadline ends it first
                if time.perf_counter() > stop_at:
                    break
                t0 = time.perf_counter()
                await conn.post(f"/{'embed' if kind != 'health' else kind}", bodies[kind],
                                "GET" if kind == "health" else "POST")
                lat[kind].append((time.perf_counter() - t0) * 1000)
                await asyncio.sleep(0.02 if kind == "health" else 0)
            conn.close()

        await asyncio.gather(*(client(k) for k in kinds))
        return {"loop_lag_s": round(_lag_sum(url) - lag0, 3), **{
            k: {"n": len(v), **{f"p{q}_ms": round(float(np.percentile(v, q)), 1)
                                for q in (50, 90, 99)}} for k, v in lat.items()}}

    try:
        asyncio.run(phase(("embed", "health")))  # warm-up
        report = {"big_inputs": big_inputs, "seconds": seconds,
                  "alone": asyncio.run(phase(("embed", "health"))),
                  "with_big": asyncio.run(phase(("embed", "health", "big")))}
    finally:
        _stop(proc)
    log(json.dumps(report))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _lag_sum(url: str) -> float:
    """Seconds the server's event loop ran late so far (0 where it has no such metric)."""
    m = re.search(r"^sureserve_event_loop_lag_seconds_sum (\S+)$",
                  httpx.get(f"{url}/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def print_report(rep: dict[str, Any], log: Callable[[str], None]) -> None:
    """The report as a table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    t = Table("contender", "clients", "req/s", "x offline", "p50 ms", "p95 ms", "p99 ms",
              "p99/p50", "avg batch", "errors",
              title=f"serve: offline engine {rep['offline_texts_per_s']} texts/s")
    for name, rows in rep["contenders"].items():
        for r in rows:
            t.add_row(name, str(r["clients"]), str(r["req_per_s"]), str(r["vs_offline"]),
                      str(r["p50_ms"]), str(r["p95_ms"]), str(r["p99_ms"]),
                      str(r["p99_over_p50"]), str(r.get("avg_batch_size", "-")),
                      str(r["errors"]))
    Console(width=200).print(t)

