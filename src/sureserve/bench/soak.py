"""``sureserve bench soak``: does the server stay flat under hours of mixed traffic?

One server (``serve minilm sentiment-demo smollm2`` on loopback) and N closed-loop clients,
each drawing its next request from a seeded mix: embeddings of 1-8 texts (tweets, reviews,
whole news articles with ``truncate``), classifications, streaming and non-streaming
completions, streams the client abandons after the first chunk, and a share of bad
requests (malformed JSON, wrong types, unknown models, bodies over ``--max-payload-bytes``
sent with a Content-Length, too many inputs). Every few seconds it samples the server
process (RSS, threads, open file descriptors, and from ``/metrics`` the Python heap's
allocated blocks, live asyncio tasks, KV-cache bytes) and the window's latency
percentiles and error counts.

The verdict is the issue's: RSS at the end within 10% of RSS after the warm-up, latency
percentiles flat, no 5xx, no valid request lost (a connection reset or a timeout on a
request that should have been answered). The expected answers for bad requests are their
documented 4xx; 429 (capacity) is counted, not an error.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sureserve.bench.harness import write_report
from sureserve.bench.serve import Lost, _Conn, _start, _stop, free_port
from sureserve.server.metrics import Scrape

REQUEST_TIMEOUT_S = 120.0
#: (kind, weight): what one client request is, by share of all requests
MIX: tuple[tuple[str, float], ...] = (
    ("embed", 0.40), ("predict", 0.26), ("complete", 0.08), ("stream", 0.08),
    ("abandon", 0.04), ("bad_json", 0.03), ("bad_field", 0.03), ("unknown_model", 0.02),
    ("too_large", 0.03), ("too_many", 0.03),
)
#: answers each kind may get without counting as an error (429: capacity, by design)
EXPECTED: dict[str, set[int]] = {
    "embed": {200, 429}, "predict": {200, 429}, "complete": {200, 429},
    "stream": {200, 429}, "abandon": {200, 429}, "bad_json": {400, 422},
    "bad_field": {422}, "unknown_model": {404}, "too_large": {413}, "too_many": {413},
}


@dataclass
class _Window:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0
    server_errors: int = 0
    lost: int = 0

    def add(self, kind: str, status: int, seconds: float) -> None:
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        if status >= 500:
            self.server_errors += 1
        if status not in EXPECTED[kind]:
            self.unexpected += 1
        elif status == 200:
            self.latencies.setdefault(kind, []).append(seconds)


def _bodies(texts: Sequence[str], rng: random.Random, max_payload: int
            ) -> Callable[[str], tuple[str, bytes]]:
    def pick(n: int) -> list[str]:
        return [texts[rng.randrange(len(texts))] for _ in range(n)]

    def make(kind: str) -> tuple[str, bytes]:
        if kind == "embed":
            return "/embed", json.dumps({"model": "minilm", "inputs": pick(rng.randint(1, 8)),
                                         "truncate": True}).encode()
        if kind == "predict":
            return "/predict", json.dumps({"model": "sentiment-demo",
                                           "inputs": pick(rng.randint(1, 8)),
                                           "truncate": True}).encode()
        if kind in ("complete", "stream", "abandon"):
            prompt = pick(1)[0][:300]
            return "/v1/completions", json.dumps({
                "model": "smollm2", "prompt": prompt, "max_tokens": rng.randint(4, 16),
                "stream": kind != "complete"}).encode()
        if kind == "bad_json":
            return "/embed", b'{"inputs": ["unterminated'
        if kind == "bad_field":
            return "/embed", json.dumps({"model": "minilm", "inputs": 42}).encode()
        if kind == "unknown_model":
            return "/embed", json.dumps({"model": "no-such-model", "inputs": "hi"}).encode()
        if kind == "too_large":
            return "/embed", json.dumps({"model": "minilm",
                                         "inputs": "x" * (max_payload + 1000)}).encode()
        if kind == "too_many":
            return "/embed", json.dumps({"model": "minilm", "inputs": ["a"] * 10_000}).encode()
        raise ValueError(kind)
    return make


async def _soak(url: str, pid: int, texts: Sequence[str], clients: int, seconds: float,
                sample_s: float, max_payload: int, seed: int,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    import psutil

    host, port = url.removeprefix("http://").split(":")
    proc = psutil.Process(pid)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    stop_at = time.monotonic() + seconds
    window = _Window()
    samples: list[dict[str, Any]] = []
    start = time.monotonic()

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        make = _bodies(texts, rng, max_payload)
        conn = _Conn(host, int(port))
        try:
            while time.monotonic() < stop_at:
                kind = rng.choices(kinds, weights)[0]
                path, body = make(kind)
                t0 = time.perf_counter()
                try:
                    status = await asyncio.wait_for(
                        conn.post(path, body, abandon=kind == "abandon"), REQUEST_TIMEOUT_S)
                except (Lost, TimeoutError, OSError):
                    window.lost += 1
                    continue
                window.add(kind, status, time.perf_counter() - t0)
        finally:
            conn.close()

    async def sampler() -> None:
        nonlocal window
        async with httpx.AsyncClient(timeout=30) as http:
            while time.monotonic() < stop_at:
                await asyncio.sleep(min(sample_s, max(stop_at - time.monotonic(), 0.01)))
                done, window = window, _Window()
                metrics = Scrape((await http.get(f"{url}/metrics")).text)
                row: dict[str, Any] = {
                    "t_s": round(time.monotonic() - start, 1),
                    "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                    "threads": proc.num_threads(), "fds": proc.num_fds(),
                    "py_blocks": int(metrics.total("sureserve_python_allocated_blocks")),
                    "tasks": int(metrics.total("sureserve_asyncio_tasks")),
                    "kv_bytes": int(metrics.total("sureserve_kv_cache_bytes")),
                    "requests": sum(done.statuses.values()), "statuses": done.statuses,
                    "unexpected": done.unexpected, "server_errors": done.server_errors,
                    "lost": done.lost}
                for kind, lat in done.latencies.items():
                    ms = np.asarray(lat) * 1000
                    row[f"{kind}_p50_ms"] = round(float(np.percentile(ms, 50)), 1)
                    row[f"{kind}_p99_ms"] = round(float(np.percentile(ms, 99)), 1)
                samples.append(row)
                log(f"{row['t_s']:>6.0f}s rss {row['rss_mb']:>6.0f} MB blocks "
                    f"{row['py_blocks']:>8} tasks {row['tasks']:>3} fds {row['fds']:>3} "
                    f"req {row['requests']:>4} embed p50 {row.get('embed_p50_ms', 0):.0f} "
                    f"p99 {row.get('embed_p99_ms', 0):.0f} ms 5xx {row['server_errors']} "
                    f"lost {row['lost']} bad {row['unexpected']}")

    await asyncio.gather(sampler(), *(client(i) for i in range(clients)))
    return samples


def summarize(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """The verdict: end RSS vs RSS after the warm-up, latency drift, 5xx and losses."""
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples
    base, end = after[0], samples[-1]
    growth = end["rss_mb"] / base["rss_mb"] - 1

    def p(rows: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return float(np.median(vals)) if vals else None

    third = max(len(after) // 3, 1)
    drift = {}
    for key in ("embed_p50_ms", "embed_p99_ms", "predict_p50_ms", "predict_p99_ms",
                "complete_p50_ms", "stream_p50_ms"):
        first, last = p(after[:third], key), p(after[-third:], key)
        if first and last:
            drift[key] = {"first_third": first, "last_third": last,
                          "ratio": round(last / first, 2)}
    totals = {k: sum(s[k] for s in samples) for k in ("requests", "server_errors", "lost",
                                                      "unexpected")}
    statuses: dict[str, int] = {}
    for s in samples:
        for k, v in s["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    ok = (abs(growth) <= 0.10 and totals["server_errors"] == 0 and totals["lost"] == 0
          and totals["unexpected"] == 0)
    return {"rss_after_warmup_mb": base["rss_mb"], "rss_end_mb": end["rss_mb"],
            "rss_peak_mb": max(s["rss_mb"] for s in samples),
            "rss_growth": round(growth, 4), "latency_drift": drift, **totals,
            "statuses": statuses, "verdict": "pass" if ok else "fail"}


def run_soak(minutes: float = 30.0, clients: int = 64, warmup_minutes: float = 5.0,
             sample_s: float = 10.0, seed: int = 0, extra_args: Sequence[str] = (),
             env: dict[str, str] | None = None, out: Path | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    from sureserve.zoo.corpora import realistic_mix

    texts = realistic_mix(2000, 0.1, seed=seed)
    max_payload = 2_000_000
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sureserve.cli", "serve", "minilm", "sentiment-demo",
           "smollm2", "--max-payload-bytes", str(max_payload), *extra_args, "--port", str(port)]
    proc = _start(cmd, url, env)
    try:
        samples = asyncio.run(_soak(url, proc.pid, texts, clients, minutes * 60, sample_s,
                                    max_payload, seed, log))
    finally:
        _stop(proc)
    report = {"minutes": minutes, "clients": clients, "warmup_minutes": warmup_minutes,
              "mix": dict(MIX), "server": cmd[3:], "env": env or {},
              "summary": summarize(samples, warmup_minutes * 60), "samples": samples}
    return write_report(out, report)


def print_report(report: dict[str, Any], log: Callable[[str], None] = print) -> None:
    s = report["summary"]
    log(f"soak: {report['minutes']} min, {report['clients']} clients, "
        f"{s['requests']} requests ({s['statuses']})")
    log(f"RSS after {report['warmup_minutes']} min warm-up {s['rss_after_warmup_mb']:.0f} MB, "
        f"at the end {s['rss_end_mb']:.0f} MB ({s['rss_growth']:+.1%}), peak "
        f"{s['rss_peak_mb']:.0f} MB")
    for key, d in s["latency_drift"].items():
        log(f"  {key}: first third {d['first_third']:.0f} ms, last third "
            f"{d['last_third']:.0f} ms (x{d['ratio']})")
    log(f"5xx {s['server_errors']}, lost {s['lost']}, unexpected answers {s['unexpected']}: "
        f"{s['verdict'].upper()}")
