"""NVIDIA's perf_analyzer, the load generator Triton and KServe users already have, drives
the node natively: HTTP (over TCP: it cannot use a Unix socket), gRPC, and inputs and
outputs in system shared memory; in-process and with workers.

perf_analyzer is installed by scripts/bench/perf-analyzer-install (cached under .bench/);
where that cannot be done here (no network, another platform) the test is skipped, saying
why."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, Agent, declaration, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    done = subprocess.run(
        [str(ROOT / "scripts/bench/perf-analyzer-install")], capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    if done.returncode == 3:
        pytest.skip(f"perf_analyzer cannot be installed here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["in-process", "workers"])
def ports(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mlp_dir: Path
) -> Iterator[tuple[int, int]]:
    agent = Agent(tmp_path_factory.mktemp(request.param) / "agent")
    http_port, grpc_port = free_port(), free_port()
    workers = ["--workers", "2"] if request.param == "workers" else []
    agent.start("--http-port", str(http_port), "--grpc-port", str(grpc_port), *workers)
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.wait_state("mlp", "Warm")
    yield http_port, grpc_port
    agent.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("memory", ["none", "system"])
def test_perf_analyzer_drives_the_node(
    perf_analyzer: Path, ports: tuple[int, int], protocol: str, memory: str
) -> None:
    port = ports[0] if protocol == "http" else ports[1]
    command = [
        str(perf_analyzer), "-m", "mlp", "-i", protocol, "-u", f"127.0.0.1:{port}",
        "--shared-memory", memory, "--concurrency-range", "1:4:3",
        # Short and always "stable": this checks that it works, not how fast.
        "--measurement-mode", "count_windows", "--measurement-request-count", "50",
        "--max-trials", "3", "--stability-percentage", "999",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Concurrency: 1, throughput:" in done.stdout
    assert "Concurrency: 4, throughput:" in done.stdout
    # Its server-side columns come from our statistics: every request counted.
    assert "Successful request count: 0" not in done.stdout
