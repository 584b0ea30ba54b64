"""The workers' serving metrics as one exposition: each series summed over the workers."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["merge_metrics"]


class _Snapshot(Collector):
    """Metric families already collected (from the workers), for one exposition."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_metrics(texts: Iterable[str]) -> CollectorRegistry:
    """Prometheus texts (one per worker) summed per series; a ``_created`` sample keeps
    the earliest time, so a family appears once however many workers report it."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], Sample] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                seen = values.get(key)
                if seen is None:
                    values[key] = sample
                elif sample.name.endswith("_created"):
                    values[key] = seen._replace(value=min(seen.value, sample.value))
                else:
                    values[key] = seen._replace(value=seen.value + sample.value)
    for (name, _, _), sample in values.items():
        families[name].samples.append(sample)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(list(families.values())))
    return registry
