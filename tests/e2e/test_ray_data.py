"""Offline jobs on Ray Data, on a local Ray cluster bound to 127.0.0.1 (shared by the
session): the same rows as the local engine, gate failures, bad lines, a killed actor."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from sureserve.settings import Settings
from sureserve.zoo import ZOO
from tests import mutations as M
from tests.cli import cli

pytestmark = pytest.mark.e2e
LONG = " ".join(["The committee met again to discuss the budget and the roads."] * 40)


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Short and long texts, and one bad line (not JSON) in the middle."""
    from sureserve.zoo.corpora import realistic_mix

    texts = [*realistic_mix(240, 0.05, seed=12), LONG, "ok", LONG[:900]]
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(100, "{this is not json")
    path = tmp_path_factory.mktemp("raydata") / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    """A Ray job, run by the CLI in this test process (connected to the session's cluster:
    a fresh interpreter would only add its ~4 s of imports; the killed-actor job below runs
    in a real process, connecting by ``--ray-address``). A small planner window makes
    batches of 32 texts, so that both actors work and their results must be put back in
    order."""
    return cli(*args, "--ray", "--ray-address", address, "--planner-window", "64",
               timeout=900, process=False)


def test_the_cluster_binds_only_loopback(ray_cluster: str) -> None:
    import ray

    assert ray_cluster.startswith("127.0.0.1:")
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    ray_procs = [p for p in psutil.process_iter(["name", "cmdline"])
                 if "ray" in " ".join(p.info["cmdline"] or []) or p.info["name"] in
                 ("gcs_server", "raylet")]
    listening = {(c.laddr.ip, p.info["name"]) for p in ray_procs
                 for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert listening and all(loopback(ip) for ip, _ in listening), listening


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return (mapped or addr).is_loopback


def same_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Ray's rows are the local engine's: order, line numbers, truncation, answers."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x["index"], x["line"], x["truncated"], x["chunks"]) == \
            (y["index"], y["line"], y["truncated"], y["chunks"])
        if "embedding" in x:
            u, v = np.asarray(x["embedding"]), np.asarray(y["embedding"])
            assert float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)) >= 0.99999
            assert np.abs(u - v).max() < 1e-4
        else:
            assert x["label"] == y["label"] and abs(x["score"] - y["score"]) < 1e-4
    assert any(r["truncated"] for r in b)


def test_ray_classify_rows_equal_the_local_engine(texts_file: Path, ray_cluster: str,
                                                  tmp_path: Path) -> None:
    """(Embeddings are compared the same way in the killed-actor job below.)"""
    common = ("classify", "-i", str(texts_file), "--truncation", "truncate",
              "--skip-bad-lines")
    local = cli(*common, "-o", str(tmp_path / "local.jsonl"))
    assert local.returncode == 0, local.stderr
    remote = run(*common, "-o", str(tmp_path / "ray.jsonl"), address=ray_cluster)
    assert remote.returncode == 0, remote.stderr
    assert "skipped line 101" in remote.stderr
    assert len(re.findall(r"actor pid \d+: [1-9]", remote.stderr)) == 2, remote.stderr
    a, b = rows(tmp_path / "local.jsonl"), rows(tmp_path / "ray.jsonl")
    assert len(b) == 243
    same_rows(a, b)


def test_a_bad_line_stops_the_job_after_the_rows_before_it(texts_file: Path, ray_cluster: str,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    # one actor: stopping at a bad line is the driver's doing, whatever the actors
    r = run("classify", "-i", str(texts_file), "-o", str(out), "--truncation", "truncate",
            "--replicas", "1", address=ray_cluster)
    assert r.returncode == 1 and "line 101: not valid JSON" in r.stderr, r.stderr
    assert [x["line"] for x in rows(out)] == list(range(1, 101))


def test_a_failed_gate_stops_the_job_with_no_output(texts_file: Path, ray_cluster: str,
                                                    tmp_path: Path) -> None:
    mini = ZOO["minilm"].path(Settings())
    broken = M.with_tokenizer(mini, M.shuffled_tokenizer(mini, tmp_path / "t"), tmp_path / "m")
    out = tmp_path / "out.jsonl"
    r = run("embed", "-i", str(texts_file), "-o", str(out), "-m", str(broken),
            "--skip-bad-lines", "--replicas", "1", address=ray_cluster)
    assert r.returncode == 3, r.stderr
    assert "failed its preflight gate" in r.stderr and "alignment" in r.stderr
    assert not out.exists()


def test_parquet_in_and_out_and_the_python_api(ray_cluster: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    import sureserve
    import sureserve.ray

    texts = [f"review {k}: " + ("good " if k % 2 else "dull ") * (1 + k % 7) for k in range(60)]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"body": texts}), src)
    out = tmp_path / "out.parquet"
    # one actor for each (two actors' rows put back in order: the file jobs' tests above)
    summary = sureserve.ray.embed(src, output=out, field="body", replicas=1)
    assert summary.summary.texts == 60
    table = pq.read_table(out)
    assert table.column("index").to_pylist() == list(range(60))
    ref = sureserve.load("minilm").embed(texts)
    got = np.asarray(table.column("embedding").to_pylist())
    assert np.abs(got - ref).max() < 1e-4
    # a caller's own Dataset
    ds = sureserve.ray.classify(ray.data.from_items([{"text": t} for t in texts]), replicas=1)
    labels = [json.loads(r["result"])["label"] for r in ds.take_all()]
    assert labels == [x["label"] for x in sureserve.load("sentiment-demo").classify(texts)]


def test_a_killed_actor_is_restarted_and_every_row_written_once(ray_cluster: str,
                                                                tmp_path: Path) -> None:
    """An embedding job (1,500 texts, long ones and a bad line among them) loses an actor
    mid-job: the actor is restarted, and every row is written once, in order, equal to the
    local engine's rows (this is also the suite's Ray-vs-local check for embeddings)."""
    from sureserve.zoo.corpora import realistic_mix

    texts = [*realistic_mix(1500, 0.02, seed=4), LONG]
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(700, "{this is not json")
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    common = ("embed", "-i", str(src), "--truncation", "truncate", "--skip-bad-lines")
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "sureserve.cli", *common, "-o", str(out),
                             "--ray", "--ray-address", ray_cluster, "--planner-window", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 600
    while proc.poll() is None and killed is None and time.monotonic() < deadline:
        time.sleep(0.3)
        workers = [p for p in psutil.process_iter(["cmdline"])
                   if any("BoundWorker" in c for c in p.info["cmdline"] or [])]
        written = out.exists() and out.stat().st_size > 0
        if workers and written:  # mid-job: rows are out, actors are busy
            killed = workers[0].pid
            os.kill(killed, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert killed is not None, "the job ended before an actor could be killed"
    assert proc.returncode == 0, err[-3000:]
    assert "skipped line 701" in err
    # both actors worked (a restarted one reports under its new pid)
    assert len(re.findall(r"actor pid \d+: [1-9]", err)) >= 2, err
    got = rows(out)
    assert [r["index"] for r in got] == list(range(1501))
    local = cli(*common, "-o", str(tmp_path / "local.jsonl"))
    assert local.returncode == 0, local.stderr
    same_rows(rows(tmp_path / "local.jsonl"), got)
