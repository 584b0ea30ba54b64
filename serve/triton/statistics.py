"""Triton's statistics extension: per model version, what ``GET /v2/models[/{m}]/stats``
and gRPC ``ModelStatistics`` answer, with Triton's field names.

Counted exactly, one request at a time, by the process that runs the model: each worker
keeps its own counters and the agent sums the workers' answers (``merge``). Durations are
nanoseconds of ``perf_counter_ns``; ``last_inference`` is milliseconds since the epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from nodecache.serve.errors import ModelNotFound
from nodecache.serve.routing import Caller, Route, RoutingTable

__all__ = ["ModelCounters", "RequestTiming", "Statistics", "merge", "statistics_routes"]

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
              "cache_hit", "cache_miss")  # fmt: skip


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        if ns > 0:
            self.ns += ns


class RequestTiming:
    """One request's way through the dataplane, as ``perf_counter_ns`` readings: filled in
    as it goes, recorded once at the end (``Statistics.record``). A plain class with slots:
    one is made per request."""

    __slots__ = ("began", "checked", "ended", "rows", "started")

    def __init__(self) -> None:
        self.started = time.perf_counter_ns()
        self.checked = 0  # inputs checked, about to wait for the model
        self.began = 0  # the runtime call (or its batch's) began
        self.ended = 0  # ... and returned
        self.rows = 1  # inferences this request asked for (its batch rows, if batched)


@dataclass
class _Batch:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelCounters:
    """One model version's counters."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    batches: dict[int, _Batch] = field(default_factory=dict)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        def duration(d: Duration) -> dict[str, int]:
            return {"count": d.count, "ns": d.ns}

        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: duration(getattr(self, k)) for k in _DURATIONS},
            "response_stats": {},
            "batch_stats": [
                {"batch_size": size, **{f.name: duration(getattr(b, f.name)) for f in fields(b)}}
                for size, b in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


class Statistics:
    """Counters of every model this process served, by its key on the node (a version of
    a served name); reported under the served name and version."""

    def __init__(self) -> None:
        self._models: dict[str, ModelCounters] = {}

    def record(self, key: str, timing: RequestTiming, ok: bool) -> None:
        """A request that reached the model ended now: a success with its phases, or a
        failure (refused input, runtime error, answer too large)."""
        now = time.perf_counter_ns()
        counters = self._counters(key)
        if not ok:
            counters.fail.add(now - timing.started)
            return
        counters.success.add(now - timing.started)
        counters.queue.add(timing.began - timing.checked)
        counters.compute_input.add(timing.checked - timing.started)
        counters.compute_infer.add(timing.ended - timing.began)
        counters.compute_output.add(now - timing.ended)
        counters.inference_count += timing.rows
        counters.last_inference = time.time_ns() // 1_000_000

    def executed(self, key: str, batch_size: int, ns: int) -> None:
        """One runtime call (a whole batch counts once) took ``ns``."""
        counters = self._counters(key)
        counters.execution_count += 1
        batch = counters.batches.get(batch_size)
        if batch is None:
            batch = counters.batches[batch_size] = _Batch()
        batch.compute_input.add(0)
        batch.compute_infer.add(ns)
        batch.compute_output.add(0)

    def _counters(self, key: str) -> ModelCounters:
        counters = self._models.get(key)
        if counters is None:
            counters = self._models[key] = ModelCounters()
        return counters

    def report(self, models: list[tuple[str, str, str]]) -> dict[str, Any]:
        """``{"model_stats": [...]}`` for these (key, served name, version), sorted by name
        and version (zeros for a model never asked)."""
        ordered = sorted(models, key=lambda m: (m[1], m[2]))
        return {
            "model_stats": [
                self._models.get(key, ModelCounters()).to_json(name, version)
                for key, name, version in ordered
            ]
        }


def statistics_routes(
    table: RoutingTable, name: str | None, version: str | None, caller: Caller
) -> list[Route]:
    """The versions a statistics request covers: the name's (one of them, if named), else
    every version the caller may use. 404 for a version the name does not have."""
    if name is None:
        return table.visible(caller)
    routes = [r for r in table.versions(name, caller) if version in (None, r.version)]
    if not routes:
        raise ModelNotFound(name, version)
    return routes


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' ``model_stats`` answers, per (name, version); the
    latest ``last_inference`` wins."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for report in reports:
        for entry in report.get("model_stats", []):
            key = (entry["name"], entry["version"])
            into = merged.get(key)
            if into is None:
                merged[key] = entry
                continue
            into["inference_count"] += entry["inference_count"]
            into["execution_count"] += entry["execution_count"]
            into["last_inference"] = max(into["last_inference"], entry["last_inference"])
            for kind, d in entry["inference_stats"].items():
                _add(into["inference_stats"].setdefault(kind, {"count": 0, "ns": 0}), d)
            batches = {b["batch_size"]: b for b in into["batch_stats"]}
            for batch in entry["batch_stats"]:
                mine = batches.get(batch["batch_size"])
                if mine is None:
                    into["batch_stats"].append(batch)
                    continue
                for kind in ("compute_input", "compute_infer", "compute_output"):
                    _add(mine[kind], batch[kind])
    return {"model_stats": [merged[key] for key in sorted(merged)]}


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    into["count"] += more["count"]
    into["ns"] += more["ns"]
