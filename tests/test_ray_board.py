"""The pure parts of Ray Serve's replica view: health over every replica, metrics pages
merged with a replica label, the replica options chosen from the settings."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sureserve.errors import SettingsError
from sureserve.ray.board import LOST_AFTER, combine_health, relabel
from sureserve.ray.serving import resources, scaling
from sureserve.server.metrics import Scrape
from sureserve.settings import Settings


def entry(replica: str, status: str = "ready", age: float = 0.5, **kw: Any) -> dict[str, Any]:
    return {"replica": replica, "pid": hash(replica) % 10000, "node": "n1", "status": status,
            "models": {"minilm": status}, "reason": kw.get("reason"),
            "drift": kw.get("drift", []), "age_s": age}


def test_all_ready_is_ok_and_lists_every_replica() -> None:
    body, code = combine_health([entry("b"), entry("a")], 2, False)
    assert code == 200 and body["status"] == "ok"
    assert [r["replica"] for r in body["replicas"]] == ["a", "b"]
    assert body["models"] == {"minilm": "ready"}


def test_a_silent_replica_is_lost_until_ray_has_replaced_it() -> None:
    dead = entry("a", age=LOST_AFTER + 1)
    body, code = combine_health([dead, entry("b")], 2, False)
    assert code == 200 and body["status"] == "degraded"
    lost = next(r for r in body["replicas"] if r["replica"] == "a")
    assert lost["status"] == "lost" and "no report" in lost["reason"]
    # the replacement reports (loading): Serve counts 2 replicas, 2 report: the lost one goes
    body, code = combine_health([dead, entry("b"), entry("c", "loading")], 2, False)
    assert [r["status"] for r in body["replicas"]] == ["ready", "loading"]
    assert body["status"] == "degraded" and code == 200
    body, _ = combine_health([dead, entry("b"), entry("c")], 2, False)
    assert body["status"] == "ok"
    # Serve's count unknown: shown as lost (the board forgets it later)
    body, _ = combine_health([dead, entry("b"), entry("c")], None, False)
    assert body["status"] == "degraded"


def test_no_ready_replica_is_503_loading_or_failed() -> None:
    body, code = combine_health([entry("a", "loading")], 1, False)
    assert (code, body["status"]) == (503, "loading")
    body, code = combine_health([entry("a", "failed", reason="minilm: gate failed")], 1, False)
    assert (code, body["status"]) == (503, "failed") and "gate failed" in body["reason"]
    body, code = combine_health([], None, False)
    assert (code, body["status"]) == (503, "loading")


def test_drift_on_any_replica_degrades_and_can_make_it_unhealthy() -> None:
    alert = {"model": "minilm", "signal": "collapse", "score": 0.5, "threshold": 0.3,
             "alert": True, "detail": "x"}
    body, code = combine_health([entry("a", drift=[alert]), entry("b")], 2, False)
    assert (code, body["status"], body["drift"]) == (200, "degraded", [alert])
    _, code = combine_health([entry("a", drift=[alert]), entry("b")], 2, True)
    assert code == 503


def page(requests: int) -> bytes:
    r = CollectorRegistry()
    Counter("sureserve_requests_total", "HTTP requests", ["route"], registry=r) \
        .labels("/embed").inc(requests)
    Histogram("sureserve_batch_size", "Inputs per pass", buckets=(1, 8), registry=r) \
        .observe(requests)
    return generate_latest(r)


def test_relabel_merges_pages_with_a_replica_label() -> None:
    text = relabel([("a", page(3)), ("b", page(5))]).decode()
    assert text.count("# TYPE sureserve_requests_total counter") == 1
    scrape = Scrape(text)
    assert scrape.total("sureserve_requests_total") == 8
    assert scrape.total("sureserve_requests_total", replica="b", route="/embed") == 5
    assert scrape.total("sureserve_batch_size_count", replica="a") == 1
    assert scrape.buckets("sureserve_batch_size") == [(1.0, 0.0), (8.0, 2.0),
                                                      (float("inf"), 0.0)]


def test_scaling_fixed_or_autoscaling_and_its_usage_errors() -> None:
    assert scaling(Settings(), 3) == {"num_replicas": 3}
    auto = scaling(Settings(ray_min_replicas=1, ray_max_replicas=4,
                            ray_target_ongoing_requests=3), 2)
    assert auto["num_replicas"] == "auto"
    assert auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 3
    for bad in ({"ray_min_replicas": 2}, {"ray_min_replicas": 3, "ray_max_replicas": 2}):
        with pytest.raises(SettingsError, match="--ray-min-replicas"):
            scaling(Settings(**bad), 2)


def test_resources_share_cpus_and_ask_a_gpu_when_the_plan_is_cuda() -> None:
    assert resources(Settings(), {"CPU": 2.0}, 2) == {"num_cpus": 1.0}
    assert resources(Settings(), {"CPU": 16.0, "GPU": 2.0}, 2) == {"num_cpus": 8.0,
                                                                  "num_gpus": 1.0}
    assert resources(Settings(device="cpu"), {"CPU": 16.0, "GPU": 2.0}, 4) == {"num_cpus": 4.0}
    with pytest.raises(SettingsError, match="no GPU"):
        resources(Settings(device="cuda:0"), {"CPU": 4.0}, 2)


def test_one_cpu_share_for_data_actors_and_serve_replicas() -> None:
    from sureserve.ray.cluster import cpu_share

    assert cpu_share({"CPU": 2.0}, 2) == 1 and cpu_share({"CPU": 16.0}, 3) == 5
    assert cpu_share({"CPU": 2.0}, 4) == 1 and cpu_share({}, 2) == 1  # at least one


def test_serve_ray_with_one_autoscaling_bound_is_a_usage_error_before_ray_starts() -> None:
    from tests.cli import cli

    r = cli("serve", "--ray", "--ray-min-replicas", "2", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "autoscaling needs both bounds" in r.stderr and "--ray-max-replicas" in r.stderr


def test_a_ray_job_with_a_drift_reference_is_refused_before_ray_starts(tmp_path: Any) -> None:
    """No actor sees the whole job, so none could compare it with the reference: refused
    (exit 2) rather than accepted and silently not checked."""
    from tests.cli import cli

    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("a reference text\n")
    r = cli("embed", "-i", str(src), "--ray", "--reference", str(ref), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "does not apply to a Ray job" in r.stderr and "without --ray" in r.stderr


def gate_page(passed: int) -> bytes:
    r = CollectorRegistry()
    Gauge("sureserve_gate_passed", "gate", ["model"], registry=r).labels("minilm").set(passed)
    return generate_latest(r)


def test_doctor_url_reads_every_replica_of_a_ray_deployment() -> None:
    from sureserve.doctor.remote import _health

    page = Scrape(relabel([("a", gate_page(1)), ("b", gate_page(1))]).decode())
    body, _ = combine_health([entry("a"), entry("b", age=LOST_AFTER + 1)], None, False)
    found = _health(body, {}, page)
    assert found.verdict == "warn" and "1 of 2 ready" in found.evidence
    assert "b (pid" in found.evidence and "no report" in found.fix
    body, _ = combine_health([entry("a"), entry("b")], 2, False)
    assert _health(body, {}, page).verdict == "pass"
    # one replica's model failed its gate: the worst replica counts
    page = Scrape(relabel([("a", gate_page(1)), ("b", gate_page(0))]).decode())
    found = _health(body, {}, page)
    assert found.verdict == "fail" and "minilm NO" in found.evidence
