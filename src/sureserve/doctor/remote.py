"""``sureserve doctor --url``: read a running server's /health, /info and /metrics and turn
them into findings (capacity, overload, padding, truncation, drift, gate), plus what the
HTML page charts."""

from __future__ import annotations

from typing import Any

from sureserve.doctor.report import Finding, Verdict
from sureserve.server.metrics import Scrape

QUEUE_WARN, QUEUE_FAIL = 2.0, 10.0  # mean queue time / mean forward time
REJECT_WARN, REJECT_FAIL = 0.005, 0.05  # share of requests answered 429
PADDING_WARN = 0.25
TRUNCATED_WARN = 0.01


def fetch(url: str, api_key: str | None) -> tuple[dict[str, Any], dict[str, Any], Scrape]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=10) as client:
        health = client.get("/health").json()
        info_r = client.get("/info")
        info = info_r.json() if info_r.status_code == 200 else {"models": [], "error":
                                                                 info_r.text[:200]}
        metrics = Scrape(client.get("/metrics").text)
    return health, info, metrics


def server_findings(url: str, api_key: str | None) -> tuple[list[Finding], dict[str, Any]]:
    """Findings from a running server, and the data its charts need."""
    try:
        health, info, m = fetch(url, api_key)
    except Exception as exc:
        return [Finding("Server unreachable", f"GET {url}/health, /info, /metrics", str(exc),
                        "fail", "start it (sureserve serve MODEL) or fix --url")], {}
    findings = [_health(health, info, m), _capacity(m), _overload(m), _padding(m),
                _truncation(m), _drift(health)]
    return findings, _charts(info, m)


def _health(health: dict[str, Any], info: dict[str, Any], m: Scrape) -> Finding:
    status = health.get("status", "?")
    lines = [f"/health: {status}; models " + ", ".join(f"{k} {v}" for k, v in
                                                       health.get("models", {}).items())]
    gates: dict[str, float] = {}  # under Ray Serve one sample per replica: the worst counts
    for lab, v in m.samples.get("sureserve_gate_passed", []):
        gates[lab["model"]] = min(v, gates.get(lab["model"], v))
    lines.append("gate passed: " + (", ".join(f"{k} {'yes' if v else 'NO'}"
                                              for k, v in gates.items()) or "no models"))
    replicas = health.get("replicas") or []
    unready = [r for r in replicas if r["status"] != "ready"]
    if replicas:
        lines.append(f"Ray Serve replicas: {len(replicas) - len(unready)} of {len(replicas)} "
                     "ready" + "".join(f"; {r['replica']} (pid {r['pid']}) {r['status']}"
                                       for r in unready))
    overridden = [x["name"] for x in info.get("models", []) if x.get("gate_overridden")]
    verdict: Verdict = "pass"
    fix = ""
    if overridden:
        verdict, fix = "warn", "a model serves although its gate failed " \
            "(accept_gate_failure): run `sureserve check` on it"
        lines.append(f"gate overridden: {', '.join(overridden)}")
    if unready:
        verdict = "warn"
        fix = "; ".join(f"{r['replica']}: {r['reason']}" for r in unready if r["reason"]) \
            or "a replica is starting: wait, and see the replicas' logs if it stays"
    if status in ("failed", "loading") or not all(gates.values()):
        verdict = "fail"
        fix = health.get("reason") or "see the server log; `sureserve check MODEL`"
    return Finding("Server health and gate", "/health, sureserve_gate_passed, /info",
                   "\n".join(lines), verdict, fix)


def _capacity(m: Scrape) -> Finding:
    queue, n = m.mean("sureserve_queue_time_seconds")
    forward, passes = m.mean("sureserve_inference_time_seconds")
    lag, _ = m.mean("sureserve_event_loop_lag_seconds")
    ratio = queue / forward if forward else 0.0
    evidence = (f"mean queue time {queue * 1000:.1f} ms over {n:.0f} inputs; mean forward "
                f"pass {forward * 1000:.1f} ms over {passes:.0f} passes (queue/forward "
                f"{ratio:.1f}x); event-loop lag {lag * 1000:.1f} ms")
    verdict: Verdict = "fail" if ratio > QUEUE_FAIL else "warn" if ratio > QUEUE_WARN \
        else "pass" if n else "skip"
    return Finding("Slow under load (capacity)", "queue time vs inference time", evidence,
                   verdict, "inputs wait longer than they compute: add replicas, give the "
                   "model more cores (--forward-workers), or lower --max-wait-ms")


def _overload(m: Scrape) -> Finding:
    total = m.total("sureserve_requests_total")
    refused = m.total("sureserve_requests_total", status="429")
    share = refused / total if total else 0.0
    verdict: Verdict = "fail" if share > REJECT_FAIL else "warn" if share > REJECT_WARN \
        else "pass"
    return Finding("Requests refused (429)", "sureserve_requests_total by status",
                   f"{refused:.0f} of {total:.0f} requests ({share:.1%}) answered 429 "
                   f"(queue full; backpressure refusals {m.total('sureserve_rejected_total'):.0f})",
                   verdict, "clients send more than the server computes: add capacity, raise "
                   "--max-queue-inputs (SURESERVE_MAX_QUEUE_INPUTS) if latency allows, and "
                   "make clients honour Retry-After")


def _padding(m: Scrape) -> Finding:
    share, n = m.mean("sureserve_padding_share")
    verdict: Verdict = "warn" if share > PADDING_WARN else "pass" if n else "skip"
    return Finding("Padding burns compute", "sureserve_padding_share", f"mean padding "
                   f"share {share:.1%} over {n:.0f} forward passes", verdict,
                   "lower --max-padding-share or --min-batch-tokens, keep --packing on")


def _truncation(m: Scrape) -> Finding:
    cut = m.total("sureserve_truncated_inputs_total")
    inputs = m.total("sureserve_batch_size_sum")
    share = cut / inputs if inputs else 0.0
    verdict: Verdict = "warn" if share > TRUNCATED_WARN else "pass" if inputs else "skip"
    return Finding("Truncated text (server)", "sureserve_truncated_inputs_total vs inputs",
                   f"{cut:.0f} of {inputs:.0f} inputs ({share:.1%}) truncated at the "
                   "client's request", verdict, "clients send texts over the model's limit: "
                   "use --truncation chunk, or a model with a longer limit")


def _drift(health: dict[str, Any]) -> Finding:
    alerts = health.get("drift", [])
    if not alerts:
        return Finding("Silent drift", "drift watch alerts (/health)", "no drift alert",
                       "pass")
    lines = [f"{a['model']} {a['signal']} = {a['score']:.3g} (threshold {a['threshold']:g}): "
             f"{a['detail']}" for a in alerts]
    return Finding("Silent drift", "drift watch alerts (/health)", "\n".join(lines), "warn",
                   "traffic or answers changed: look at what clients send now (README "
                   "'Drift watch' says what each signal means)")


def _charts(info: dict[str, Any], m: Scrape) -> dict[str, Any]:
    charts: dict[str, Any] = {
        "latency": m.buckets("sureserve_request_duration_seconds"),
        "queue_time": m.buckets("sureserve_queue_time_seconds"),
        "label_mix": {}, "drift_history": {}}
    for model in info.get("models", []):
        drift = model.get("drift") or {}
        if drift.get("label_mix"):
            charts["label_mix"][model["name"]] = drift["label_mix"]
        if drift.get("history"):
            charts["drift_history"][model["name"]] = drift["history"]
    return charts
