"""Prometheus metrics of the serving tier.

Process-wide, like prometheus_client's default registry; with worker processes each worker
keeps its own and the agent sums them at scrape time.

The metrics recorded for every request would cost a locked update each in
prometheus_client (a histogram observation two): a dozen lock round trips per request.
They are plain numbers instead, updated only from the event loop's thread and turned into
samples when scraped, with the same exposition.

Model names come from callers, so series are bounded: requests for names this node does
not hold are counted under one label value, ``UNKNOWN_MODEL``, and ``forget_model`` drops
every series of a model that was removed.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = [
    "BATCH_SIZE",
    "INFERENCE_SECONDS",
    "INFLIGHT",
    "MIRROR_DIVERGENT",
    "MIRROR_DROPPED",
    "MIRROR_REQUESTS",
    "MODEL_EVICTIONS",
    "MODEL_LOADS",
    "QUEUE_SECONDS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "RESIDENT_BYTES",
    "SERVING_METRICS",
    "UNKNOWN_MODEL",
    "RequestStats",
    "child",
    "forget_model",
    "request_counts",
    "request_stats",
]

# The model label of requests for names that are not declared on this node.
UNKNOWN_MODEL = "__unknown__"


class _CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _HistogramChild:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ends with +Inf
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount

    def buckets(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs, as the exposition format wants them."""
        cumulative, pairs = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            cumulative += count
            pairs.append((floatToGoString(bound), float(cumulative)))
        return pairs


class _PlainMetric:
    """A labelled counter, gauge or histogram of plain numbers, exported when collected."""

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float] = (),
    ) -> None:
        self._kind, self._name, self._doc = kind, name, documentation
        self._labelnames = tuple(labelnames)
        self._bounds = (*map(float, buckets), float("inf"))
        self._children: dict[tuple[str, ...], Any] = {}
        REGISTRY.register(self)

    def labels(self, *labelvalues: str) -> Any:
        found = self._children.get(labelvalues)
        if found is None:
            if len(labelvalues) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}")
            if self._kind == "histogram":
                found = _HistogramChild(self._bounds)
            else:
                found = _CounterChild() if self._kind == "counter" else _GaugeChild()
            self._children[labelvalues] = found
        return found

    def remove_model(self, name: str) -> None:
        """Drop every series whose ``model`` label is ``name``."""
        at = self._labelnames.index("model")
        for labelvalues in [k for k in self._children if k[at] == name]:
            del self._children[labelvalues]

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        return self._families(dict(self._children))

    def _families(self, children: dict[tuple[str, ...], Any]) -> Iterator[Metric]:
        name, doc, labelnames = self._name, self._doc, self._labelnames
        if self._kind == "counter":
            counters = CounterMetricFamily(name, doc, labels=labelnames)
            for labelvalues, found in children.items():
                counters.add_metric(labelvalues, found.value, created=found.created)
            yield counters
        elif self._kind == "gauge":
            gauges = GaugeMetricFamily(name, doc, labels=labelnames)
            for labelvalues, found in children.items():
                gauges.add_metric(labelvalues, found.value)
            yield gauges
        else:
            histograms = HistogramMetricFamily(name, doc, labels=labelnames)
            for labelvalues, found in children.items():
                histograms.add_metric(labelvalues, found.buckets(), found.sum)
                labels = dict(zip(labelnames, labelvalues, strict=True))
                histograms.samples.append(Sample(f"{name}_created", labels, found.created))
            yield histograms


_LATENCY = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Recorded per request (or per batch).
REQUESTS = _PlainMetric(
    "counter",
    "nodecache_requests_total",
    "Inference requests answered, by model, version, protocol (rest, grpc, v1, mirror) and "
    "HTTP status code.",
    ["model", "version", "protocol", "code"],
)
REQUEST_SECONDS = _PlainMetric(
    "histogram",
    "nodecache_request_duration_seconds",
    "Inference request time inside the server (queue + inference + encoding), by model and "
    "version.",
    ["model", "version", "protocol"],
    _LATENCY,
)
QUEUE_SECONDS = _PlainMetric(
    "histogram",
    "nodecache_queue_duration_seconds",
    "Time a request waited for the model (a load, a free slot, a batch), by model.",
    ["model"],
    _LATENCY,
)
INFERENCE_SECONDS = _PlainMetric(
    "histogram",
    "nodecache_inference_duration_seconds",
    "Time the runtime spent computing one request's (or one batch's) answer, by model.",
    ["model"],
    _LATENCY,
)
BATCH_SIZE = _PlainMetric(
    "histogram",
    "nodecache_batch_size",
    "Rows per runtime call when dynamic batching is on, by model.",
    ["model"],
    (1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INFLIGHT = _PlainMetric(
    "gauge",
    "nodecache_requests_in_flight",
    "Inference requests being answered or waiting, by model.",
    ["model"],
)
# Recorded per load or eviction (on the event loop too).
MODEL_LOADS = _PlainMetric(
    "counter", "nodecache_model_loads_total", "Model loads, by model.", ["model"]
)
MODEL_EVICTIONS = _PlainMetric(
    "counter",
    "nodecache_model_evictions_total",
    "Models unloaded to make room, or after their idle timeout, by model and reason.",
    ["model", "reason"],
)
RESIDENT_BYTES = _PlainMetric(
    "gauge",
    "nodecache_model_resident_bytes",
    "Bytes a warm model holds on its device, by model and device.",
    ["model", "device"],
)

# Recorded by the mirror (in the process that routes: the agent's, also with workers).
MIRROR_REQUESTS = _PlainMetric(
    "counter",
    "nodecache_mirror_requests_total",
    "Copies of requests sent to a mirror version (answers compared, then discarded).",
    ["model", "version"],
)
MIRROR_DROPPED = _PlainMetric(
    "counter",
    "nodecache_mirror_dropped_total",
    "Copies of requests not sent to a mirror version: its queue was full, or it failed.",
    ["model", "version"],
)
MIRROR_DIVERGENT = _PlainMetric(
    "counter",
    "nodecache_mirror_divergent_total",
    "Mirror answers whose outputs differ from the primary's beyond the tolerance.",
    ["model", "version"],
)

# Children and request stats looked up once; entries only for models a data plane
# holds (or UNKNOWN_MODEL), dropped with them by ``forget_model``.
_CHILDREN: dict[tuple[Any, tuple[str, ...]], Any] = {}
_STATS: dict[tuple[str, str, str], RequestStats] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: the lookup costs more than the update.
    The first label is the model."""
    key = (metric, labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


class RequestStats:
    """One model version's request metrics under one protocol, its children looked up once."""

    def __init__(self, model: str, version: str, protocol: str) -> None:
        self._labels = (model, version, protocol)
        self.inflight = INFLIGHT.labels(model)
        self._seconds = REQUEST_SECONDS.labels(model, version, protocol)
        # Children by status code, made on first use: only codes that happened are exported.
        self._requests: dict[str, Any] = {}

    def done(self, code: str, seconds: float) -> None:
        """A request that ``inflight.inc()`` counted has been answered with ``code``."""
        self.inflight.dec()
        requests = self._requests.get(code)
        if requests is None:
            requests = self._requests[code] = REQUESTS.labels(*self._labels, code)
        requests.inc()
        self._seconds.observe(seconds)


def request_stats(model: str, version: str, protocol: str) -> RequestStats:
    """The stats of ``model`` (a model this node holds, or UNKNOWN_MODEL; version "" when
    no version was chosen) under ``protocol``."""
    found = _STATS.get((model, version, protocol))
    if found is None:
        found = _STATS[model, version, protocol] = RequestStats(model, version, protocol)
    return found


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


def forget_model(name: str) -> None:
    """Drop every series of a model that is no longer served: a name that comes and goes
    leaves nothing behind in /metrics."""
    for metric in (*SERVING_METRICS, MIRROR_REQUESTS, MIRROR_DROPPED, MIRROR_DIVERGENT):
        metric.remove_model(name)
    for key in [k for k in _CHILDREN if k[1][0] == name]:
        del _CHILDREN[key]
    for key in [k for k in _STATS if k[0] == name]:
        del _STATS[key]


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
