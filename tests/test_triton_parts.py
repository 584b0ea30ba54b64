"""The pure parts of Triton's extensions, with plain data: statistics summed over workers,
a configuration's fields for other devices and versions, /proc/net/tcp addresses."""

from __future__ import annotations

import ipaddress

import pytest

from nodecache.serve.errors import InvalidInput
from nodecache.serve.peers import _endpoint
from nodecache.serve.runtime import TensorSpec
from nodecache.serve.triton.config import model_config
from nodecache.serve.triton.shm import _checked_key
from nodecache.serve.triton.statistics import RequestTiming, Statistics, merge


def _report(requests: int, rows: int, last: int) -> dict:
    stats = Statistics()
    for _ in range(requests):
        timing = RequestTiming()
        timing.checked = timing.began = timing.ended = timing.started
        timing.rows = rows
        stats.executed("k", rows, 1000)
        stats.record("k", timing, ok=True)
    stats.record("k", RequestTiming(), ok=False)
    (entry,) = stats.report([("k", "mlp", "1")])["model_stats"]
    entry["last_inference"] = last
    return {"model_stats": [entry]}


def test_workers_statistics_add_up_per_version() -> None:
    merged = merge([_report(3, 2, last=5), _report(1, 4, last=9), {"model_stats": []}])
    (entry,) = merged["model_stats"]
    assert (entry["name"], entry["version"]) == ("mlp", "1")
    assert entry["inference_count"] == 3 * 2 + 4 and entry["execution_count"] == 4
    assert entry["inference_stats"]["success"]["count"] == 4
    assert entry["inference_stats"]["fail"]["count"] == 2
    assert entry["last_inference"] == 9
    sizes = {b["batch_size"]: b["compute_infer"] for b in entry["batch_stats"]}
    assert sizes == {2: {"count": 3, "ns": 3000}, 4: {"count": 1, "ns": 1000}}


def test_configuration_on_a_gpu_with_named_versions() -> None:
    spec = TensorSpec("x", "BYTES", (-1, 3))
    config = model_config(
        "m", platform="pytorch", inputs=[spec], outputs=[TensorSpec("y", "FP16", (-1,))],
        versions=["2", "canary", "10"], batching=(16, 0.002), device_kind="cuda",
        device_index=1, concurrency=2,
    )  # fmt: skip
    assert (config["platform"], config["backend"]) == ("pytorch_libtorch", "pytorch")
    assert config["version_policy"] == {"specific": {"versions": [2, 10]}}
    assert config["max_batch_size"] == 16
    assert config["input"][0]["data_type"] == "TYPE_STRING" and config["input"][0]["dims"] == [3]
    assert config["output"][0]["dims"] == []
    assert config["dynamic_batching"] == {"preferred_batch_size": [16],
                                          "max_queue_delay_microseconds": 2000}  # fmt: skip
    group = config["instance_group"][0]
    assert (group["kind"], group["count"], group["gpus"]) == ("KIND_GPU", 2, [1])


def test_a_model_without_inputs_has_no_batch_dimension() -> None:
    config = model_config(
        "custom", platform="python", inputs=[], outputs=[], versions=["1"], batching=None,
        device_kind="cpu", device_index=0, concurrency=4,
    )  # fmt: skip
    assert config["max_batch_size"] == 0 and (config["platform"], config["backend"]) == (
        "", "python"
    )  # fmt: skip


def test_proc_net_tcp_addresses() -> None:
    assert _endpoint("0100007F:1F90") == (ipaddress.ip_address("127.0.0.1"), 8080)
    v6 = "00000000000000000000000001000000:0050"
    assert _endpoint(v6) == (ipaddress.ip_address("::1"), 80)
    mapped = "0000000000000000FFFF00000100007F:0050"
    assert _endpoint(mapped) == (ipaddress.ip_address("127.0.0.1"), 80)


@pytest.mark.parametrize("key", ["/a", "a.b-c_1", "x" * 255])
def test_keys_that_name_one_file(key: str) -> None:
    assert _checked_key(key) == key.lstrip("/")


@pytest.mark.parametrize("key", ["", "/", "a/b", "//a", "..", "/..", ".", "a\\0", 7, None])
def test_keys_that_do_not(key: object) -> None:
    with pytest.raises(InvalidInput):
        _checked_key(key)
