"""``sureserve bench ray``: sureserve locally and on Ray, side by side, in one run.

Ray Data (part ``data``): the same offline job run as the user runs it (``sureserve embed
-i FILE -o OUT`` with and without ``--ray``), in their own processes, on the realistic mix;
wall time includes everything a user waits for (Ray's start, every actor's model load and
gate). The outputs are compared row by row (index order and the largest cosine distance).

Ray Serve (part ``serve``): ``sureserve serve minilm`` and ``sureserve serve minilm --ray
--replicas N`` under the same closed-loop clients as ``bench serve`` (one text per
request from the realistic mix); the answers of both are compared on a sample.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sureserve.bench.harness import write_report


def _job(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sureserve.cli", *args], capture_output=True,
                       text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr[-2000:]}")
    return time.perf_counter() - start, r.stderr


def _vectors(path: Path) -> tuple[list[int], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["index"] for r in rows], np.asarray([r["embedding"] for r in rows])


def run_bench(n: int, replicas: int, out: Path | None, log: Callable[[str], None],
              parts: Sequence[str] = ("data", "serve"), clients: int = 32,
              seconds: float = 20.0, address: str | None = None) -> dict[str, Any]:
    import ray

    report: dict[str, Any] = {"ray": ray.__version__, "replicas": replicas,
                              "ray_address": address or "local, started per run"}
    # the ``--ray`` side's options: its replicas, and the cluster when one is given
    ray_args = ["--ray", "--replicas", str(replicas),
                *(["--ray-address", address] if address else [])]
    if "data" in parts:
        report["data"] = _data(n, replicas, ray_args, log)
    if "serve" in parts:
        report["serve"] = _serve(replicas, ray_args, clients, seconds, log)
    return write_report(out, report)


def _data(n: int, replicas: int, ray_args: list[str], log: Callable[[str], None]
          ) -> dict[str, Any]:
    from sureserve.zoo.corpora import realistic_mix

    texts = realistic_mix(n, 0.05, seed=21)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "mix.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        common = ["embed", "-i", str(src), "--truncation", "truncate"]
        results: dict[str, Any] = {}
        outputs = {}
        for name, extra in (("local", []), (f"ray-{replicas}", ray_args)):
            dest = Path(tmp) / f"{name}.jsonl"
            seconds, err = _job([*common, "-o", str(dest), *extra])
            outputs[name] = _vectors(dest)
            results[name] = {"seconds": round(seconds, 2), "texts_per_s": round(n / seconds, 1),
                             "summary": [line for line in err.splitlines()
                                         if line.startswith(("embed:", "  actor"))]}
            log(f"{name}: {n} texts in {seconds:.1f} s ({n / seconds:.1f} texts/s)")
    (ia, a), (ib, b) = outputs["local"], outputs[f"ray-{replicas}"]
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    local_s = results["local"]["seconds"]
    return {"texts": n, "results": results,
            "ray_over_local_throughput": round(local_s / results[f"ray-{replicas}"]
                                               ["seconds"], 3),
            "same_order": ia == ib == list(range(n)),
            "min_cosine_ray_vs_local": round(float(cos.min()), 7)}


def _until_all_ready(url: str, timeout: float = 300) -> None:
    """Ray's proxy answers as soon as one replica is up; measure once all are."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/health", timeout=30)
        if r.status_code == 200 and r.json()["status"] == "ok":
            return
        last = f"{r.status_code} {r.text[:2000]}"
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not get every replica ready in {timeout:.0f} s; last /health: "
                       f"{last}")


def _serve(replicas: int, ray_args: list[str], clients: int, seconds: float,
           log: Callable[[str], None]) -> dict[str, Any]:
    from sureserve.bench.serve import _load, _start, _stop, free_port
    from sureserve.zoo.corpora import realistic_mix

    texts = realistic_mix(2000, 0.05, seed=1)
    sample = {"inputs": texts[:16], "truncate": True}
    base = [sys.executable, "-m", "sureserve.cli", "serve", "minilm", "--truncation",
            "truncate"]
    rows: dict[str, Any] = {}
    answers = {}
    contenders = {"local": [], f"ray-{replicas}": ray_args}
    urls = {name: f"http://127.0.0.1:{free_port()}" for name in contenders}
    # both start side by side (Ray's start-up is mostly waiting on its own processes), then
    # each is measured alone while the other idles or is already stopped
    with ThreadPoolExecutor(len(contenders)) as pool:
        starting = {name: pool.submit(_start, [*base, *extra, "--port",
                                               urls[name].rsplit(":", 1)[1]], urls[name])
                    for name, extra in contenders.items()}
    procs = {name: f.result() for name, f in starting.items() if f.exception() is None}
    failed = [f.exception() for f in starting.values() if f.exception() is not None]
    if failed:
        for proc in procs.values():
            _stop(proc)
        raise failed[0]  # type: ignore[misc]
    try:
        for name, proc in procs.items():
            url = urls[name]
            _until_all_ready(url)
            # warm-up: at most as long as the measured load (a short smoke run stays short)
            asyncio.run(_load(url, texts, 4, min(3.0, seconds), 100))
            before = _cpu(proc.pid)
            rows[name] = asyncio.run(_load(url, texts, clients, seconds, 10**6))
            rows[name]["cpu_ms_per_request"] = _cpu_use(before, _cpu(proc.pid),
                                                        rows[name]["requests"])
            answers[name] = np.asarray(httpx.post(f"{url}/embed", json=sample,
                                                  timeout=60).json())
            log(f"serve {name} x{clients}: {rows[name]}")
            _stop(proc)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                _stop(proc)
    a, b = answers["local"], answers[f"ray-{replicas}"]
    return {"clients": clients, "seconds": seconds, "results": rows,
            "ray_over_local_req_per_s": round(rows[f"ray-{replicas}"]["req_per_s"] /
                                              rows["local"]["req_per_s"], 3),
            "max_abs_diff_ray_vs_local": float(np.abs(a - b).max())}


def _cpu(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of a server's process tree (Ray's workers are the raylet's
    children, so the tree holds them), each process named by its role."""
    import psutil

    out = {}
    top = psutil.Process(root)
    for p in [top, *top.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
            out[p.pid] = (_role(cmd), t.user + t.system)
        except psutil.Error:
            continue
    return out


def _role(cmd: str) -> str:
    for key, role in (("ServeReplica", "replicas"), ("ProxyActor", "proxy"),
                      ("sureserve.cli", "server")):
        if key in cmd:
            return role
    return "ray-other"


def _cpu_use(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
             requests: int) -> dict[str, float]:
    """CPU milliseconds per answered request, by role, over the load."""
    use: dict[str, float] = {}
    for pid, (role, t) in after.items():
        use[role] = use.get(role, 0.0) + t - before.get(pid, (role, 0.0))[1]
    return {role: round(1000 * t / max(requests, 1), 2) for role, t in sorted(use.items())}


def print_report(rep: dict[str, Any], log: Callable[[str], None]) -> None:
    if "data" in rep:
        d = rep["data"]
        for name, r in d["results"].items():
            log(f"data {name}: {r['seconds']} s, {r['texts_per_s']} texts/s")
        log(f"Ray Data {rep['ray']}, {rep['replicas']} replicas / local throughput: "
            f"{d['ray_over_local_throughput']}x; same order: {d['same_order']}; min cosine "
            f"{d['min_cosine_ray_vs_local']}")
    if "serve" in rep:
        v = rep["serve"]
        for name, r in v["results"].items():
            log(f"serve {name}: {r['req_per_s']} req/s, p50 {r['p50_ms']} ms, p99 "
                f"{r['p99_ms']} ms, errors {r['errors']}; CPU ms per request "
                f"{r['cpu_ms_per_request']}")
        log(f"Ray Serve {rep['ray']}, {rep['replicas']} replicas / sureserve serve at "
            f"{v['clients']} clients: {v['ray_over_local_req_per_s']}x; largest difference "
            f"{v['max_abs_diff_ray_vs_local']:.2e}")
