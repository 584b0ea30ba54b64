"""Prometheus metrics of the serving tier (process-wide, like the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["INFER_LATENCY", "INFLIGHT", "REQUESTS"]

REQUESTS = Counter(
    "nodecache_requests_total",
    "Requests answered, by model, protocol and HTTP status code.",
    ["model", "protocol", "code"],
)
INFER_LATENCY = Histogram(
    "nodecache_request_duration_seconds",
    "Time from request received to response ready, by model.",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INFLIGHT = Gauge(
    "nodecache_requests_in_flight",
    "Requests being answered, by model.",
    ["model"],
    multiprocess_mode="livesum",  # summed over worker processes
)
