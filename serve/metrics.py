"""Prometheus metrics of the serving tier.

Process-wide, like prometheus_client's default registry; with worker processes the
agent reads every worker's values through the library's multiprocess mode.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "BATCH_SIZE",
    "INFERENCE_SECONDS",
    "INFLIGHT",
    "MODEL_EVICTIONS",
    "MODEL_LOADS",
    "QUEUE_SECONDS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "RESIDENT_BYTES",
    "SERVING_METRICS",
    "child",
    "request_counts",
]

_LATENCY = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

REQUESTS = Counter(
    "nodecache_requests_total",
    "Inference requests answered, by model, protocol (rest, grpc, v1) and HTTP status code.",
    ["model", "protocol", "code"],
)
REQUEST_SECONDS = Histogram(
    "nodecache_request_duration_seconds",
    "Inference request time inside the server (queue + inference + encoding), by model.",
    ["model", "protocol"],
    buckets=_LATENCY,
)
QUEUE_SECONDS = Histogram(
    "nodecache_queue_duration_seconds",
    "Time a request waited for the model (a load, a free slot, a batch), by model.",
    ["model"],
    buckets=_LATENCY,
)
INFERENCE_SECONDS = Histogram(
    "nodecache_inference_duration_seconds",
    "Time the runtime spent computing one request's (or one batch's) answer, by model.",
    ["model"],
    buckets=_LATENCY,
)
BATCH_SIZE = Histogram(
    "nodecache_batch_size",
    "Rows per runtime call when dynamic batching is on, by model.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INFLIGHT = Gauge(
    "nodecache_requests_in_flight",
    "Inference requests being answered or waiting, by model.",
    ["model"],
    multiprocess_mode="livesum",
)
MODEL_LOADS = Counter("nodecache_model_loads_total", "Model loads, by model.", ["model"])
MODEL_EVICTIONS = Counter(
    "nodecache_model_evictions_total",
    "Models unloaded to make room, or after their idle timeout, by model and reason.",
    ["model", "reason"],
)
RESIDENT_BYTES = Gauge(
    "nodecache_model_resident_bytes",
    "Bytes a warm model holds on its device, by model and device.",
    ["model", "device"],
    multiprocess_mode="livesum",
)


@lru_cache(maxsize=4096)
def child(metric: Counter | Gauge | Histogram, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: the lookup costs more than the update."""
    return metric.labels(*labels)


# What the serving tier records per request: in worker mode the workers hold the values.
SERVING_METRICS = (
    REQUESTS,
    REQUEST_SECONDS,
    QUEUE_SECONDS,
    INFERENCE_SECONDS,
    BATCH_SIZE,
    INFLIGHT,
    MODEL_LOADS,
    MODEL_EVICTIONS,
    RESIDENT_BYTES,
)


def request_counts(registry: CollectorRegistry | None = None) -> dict[str, float]:
    """Inference requests answered so far per model (every protocol and code)."""
    counts: dict[str, float] = {}
    for family in (registry or REGISTRY).collect():
        if family.name != "nodecache_requests":
            continue
        for sample in family.samples:
            if sample.name == "nodecache_requests_total":
                model = sample.labels.get("model", "")
                counts[model] = counts.get(model, 0.0) + sample.value
    return counts
