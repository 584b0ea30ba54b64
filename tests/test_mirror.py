"""The mirror's queue and comparison, with plain coroutines for the copies (end to end, with
real agents and workers, in tests/test_versions.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import REGISTRY

from nodecache.serve.mirror import Mirror, Outputs, differ
from nodecache.serve.routing import Route

ROUTE = Route("shadow-key", "shadow", "2", traffic=0, mirror=100)


def count(metric: str) -> float:
    labels = {"model": ROUTE.key, "version": ROUTE.version}
    return REGISTRY.get_sample_value(metric, labels) or 0.0


async def outputs(value: float) -> Outputs:
    return {"y": np.full(3, value, np.float32)}


async def test_a_full_queue_drops_copies_and_never_waits() -> None:
    mirror = Mirror(queue=2, tasks=1)
    release = asyncio.Event()

    async def slow() -> Outputs:
        await release.wait()
        return await outputs(1.0)

    dropped, sent = (
        count("nodecache_mirror_dropped_total"),
        count("nodecache_mirror_requests_total"),
    )
    try:
        for _ in range(10):  # at most one in the task and two queued; the rest dropped
            mirror.offer(ROUTE, slow, lambda: outputs(1.0))
        assert count("nodecache_mirror_dropped_total") - dropped >= 7
        release.set()

        def settled() -> float:
            return (count("nodecache_mirror_requests_total") - sent) + (
                count("nodecache_mirror_dropped_total") - dropped
            )

        for _ in range(100):
            if settled() == 10:
                break
            await asyncio.sleep(0.01)
        assert settled() == 10 and count("nodecache_mirror_requests_total") - sent >= 2
    finally:
        await mirror.stop()


async def test_a_failing_mirror_is_counted_dropped_and_the_next_copy_still_goes() -> None:
    mirror = Mirror()

    async def broken() -> Outputs:
        raise RuntimeError("the shadow model is broken")

    dropped, divergent = (
        count("nodecache_mirror_dropped_total"),
        count("nodecache_mirror_divergent_total"),
    )
    try:
        mirror.offer(ROUTE, broken, lambda: outputs(1.0))
        mirror.offer(ROUTE, lambda: outputs(2.0), lambda: outputs(1.0))
        for _ in range(100):
            if count("nodecache_mirror_divergent_total") > divergent:
                break
            await asyncio.sleep(0.01)
        assert count("nodecache_mirror_dropped_total") == dropped + 1
        assert count("nodecache_mirror_divergent_total") == divergent + 1
    finally:
        await mirror.stop()


@pytest.mark.parametrize(
    ("primary", "mirror", "differs"),
    [
        ({"y": np.array([1.0, np.nan])}, {"y": np.array([1.0 + 1e-7, np.nan])}, False),
        ({"y": np.array([1.0])}, {"y": np.array([1.1])}, True),
        ({"y": np.array([1.0])}, {"y": np.array([1.0, 1.0])}, True),
        ({"y": np.array([1.0])}, {"z": np.array([1.0])}, True),
        ({"y": np.array([3], np.int64)}, {"y": np.array([3.0], np.float32)}, False),
        ({"y": np.array([b"a"], object)}, {"y": np.array([b"a"], object)}, False),
        ({"y": np.array([b"a"], object)}, {"y": np.array([b"b"], object)}, True),
    ],
)
def test_outputs_differ_beyond_the_tolerance_only(
    primary: Outputs, mirror: Outputs, differs: bool
) -> None:
    assert differ(primary, mirror, rtol=1e-3, atol=1e-5) is differs
