"""Prometheus metrics, measured at the boundaries (HTTP in/out, queue, forward pass)."""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """One registry per app, so tests (and several apps in one process) do not collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sureserve_requests_total", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("sureserve_request_duration_seconds",
                                         "HTTP request duration", ["route"], buckets=LATENCY,
                                         registry=r)
        self.queue_seconds = Histogram("sureserve_queue_time_seconds",
                                       "Time an input waited before its forward pass",
                                       buckets=LATENCY, registry=r)
        self.inference_seconds = Histogram("sureserve_inference_time_seconds",
                                           "Duration of one batched forward pass",
                                           buckets=LATENCY, registry=r)
        self.batch_size = Histogram("sureserve_batch_size", "Inputs per forward pass",
                                    buckets=BATCH_SIZES, registry=r)
        self.batch_tokens = Histogram("sureserve_batch_tokens",
                                      "Tokens computed per forward pass (padding included)",
                                      buckets=BATCH_TOKENS, registry=r)
        self.padding_share = Histogram("sureserve_padding_share",
                                       "Share of a batch's computed tokens that were padding",
                                       buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
                                       registry=r)
        self.queue_depth = Gauge("sureserve_queue_depth", "Inputs waiting for a forward pass",
                                 ["model"], registry=r)
        self.truncated = Counter("sureserve_truncated_inputs_total",
                                 "Inputs truncated at the client's request", registry=r)
        self.loop_lag = Histogram("sureserve_event_loop_lag_seconds",
                                  "How late the event loop woke from a 50 ms sleep (time "
                                  "requests waited for the loop)", buckets=LATENCY, registry=r)
        self.rejected = Counter("sureserve_rejected_total", "Requests refused by backpressure",
                                registry=r)
        # generation
        self.ttft = Histogram("sureserve_time_to_first_token_seconds",
                              "From a request's arrival to its first generated token",
                              ["model"], buckets=LATENCY, registry=r)
        self.gen_queue = Histogram(
            "sureserve_generation_queue_seconds",
            "From a request's arrival to the start of its prompt's first forward (waiting for "
            "a slot, KV-cache room, or the step in flight to end); time to first token is this "
            "plus the prefill", ["model"], buckets=LATENCY, registry=r)
        self.itl = Histogram("sureserve_inter_token_latency_seconds",
                             "Between consecutive tokens of one sequence", ["model"],
                             buckets=LATENCY, registry=r)
        self.step_seconds = Histogram("sureserve_generation_step_seconds",
                                      "One continuous-batching step (prefills + one decode)",
                                      ["model"], buckets=LATENCY, registry=r)
        self.gen_tokens = Counter("sureserve_generated_tokens_total", "Tokens generated",
                                  ["model"], registry=r)
        self.gen_running = Gauge("sureserve_running_sequences", "Sequences being decoded",
                                 ["model"], registry=r)
        self.gen_waiting = Gauge("sureserve_waiting_sequences",
                                 "Sequences waiting for KV-cache room or a slot", ["model"],
                                 registry=r)
        self.kv_reserved = Gauge("sureserve_kv_cache_reserved_tokens",
                                 "KV-cache tokens reserved by running sequences", ["model"],
                                 registry=r)
        self.kv_budget = Gauge("sureserve_kv_cache_budget_tokens",
                               "KV-cache budget (the kv_cache_mb setting, in tokens)",
                               ["model"], registry=r)
        self.kv_bytes = Gauge("sureserve_kv_cache_bytes", "KV-cache bytes allocated now",
                              ["model"], registry=r)
        self.prefix_hits = Counter("sureserve_prefix_cache_hits_total",
                                   "Prompts that reused a stored prefix's keys and values",
                                   ["model"], registry=r)
        self.prefix_misses = Counter("sureserve_prefix_cache_misses_total",
                                     "Prompts that found no stored prefix", ["model"],
                                     registry=r)
        self.prefix_tokens = Counter("sureserve_prefix_cache_reused_tokens_total",
                                     "Prompt tokens not computed again (taken from the "
                                     "prefix cache)", ["model"], registry=r)
        self.prefix_evictions = Counter("sureserve_prefix_cache_evictions_total",
                                        "Prefix blocks dropped to stay within "
                                        "prefix_cache_mb", ["model"], registry=r)
        self.prefix_bytes = Gauge("sureserve_prefix_cache_bytes",
                                  "Bytes of stored prefix keys and values", ["model"],
                                  registry=r)
        # what an operator watches for leaks (``sureserve bench soak`` samples them): RSS
        # and open fds come with the process collector
        ProcessCollector(registry=r)
        Gauge("sureserve_python_allocated_blocks", "Python heap: memory blocks allocated now",
              registry=r).set_function(sys.getallocatedblocks)
        Gauge("sureserve_asyncio_tasks", "Asyncio tasks alive in the server's event loop "
              "(requests in flight plus a few background ones)",
              registry=r).set_function(_tasks)
        self.drift_score = Gauge("sureserve_drift_score", "Drift watch: a signal's measure "
                                 "over the last drift_window inputs (README 'Drift watch')",
                                 ["model", "signal"], registry=r)
        self.drift_alert = Gauge("sureserve_drift_alert", "Drift watch: 1 while the signal is "
                                 "above its threshold", ["model", "signal"], registry=r)
        self.gate_passed = Gauge("sureserve_gate_passed",
                                 "1 when the model passed its preflight gate", ["model"],
                                 registry=r)


def _tasks() -> float:
    try:  # /metrics is rendered on the event loop; elsewhere there is nothing to count
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return 0.0


class Scrape:
    """A scraped /metrics page (the doctor's --url, the soak benchmark): name -> [(labels,
    value)], with sums over label sets."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                self.samples[s.name].append((dict(s.labels), float(s.value)))

    def total(self, name: str, **labels: str) -> float:
        return sum(v for lab, v in self.samples.get(name, [])
                   if all(lab.get(k) == x for k, x in labels.items()))

    def mean(self, histogram: str) -> tuple[float, float]:
        """(mean, count) of a histogram, over every label set."""
        count = self.total(f"{histogram}_count")
        return (self.total(f"{histogram}_sum") / count if count else 0.0), count

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """(upper bound, observations in that bucket alone), summed over label sets."""
        cum: dict[float, float] = defaultdict(float)
        for lab, v in self.samples.get(f"{histogram}_bucket", []):
            cum[float(lab["le"])] += v
        out, before = [], 0.0
        for le in sorted(cum):
            out.append((le, cum[le] - before))
            before = cum[le]
        return out
