"""Transport limits of the node socket, tried with raw sockets against a real agent: a slow
or idle peer cannot hold a connection, a body over the limit is refused before it is sent,
a deleted socket comes back, and a taken port ends the agent with one line."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, Agent, free_port, kill_tree, wait_for

GUARD = 10.0  # seconds a test waits for the server to act before calling it a hang


class PortedAgent(Agent):
    """An agent that also serves its API and its metrics on TCP ports of its own."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.http_port = free_port()
        self.metrics_port = free_port()


@pytest.fixture(scope="module", params=["in-process", "routed"])
def agent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PortedAgent]:
    """One agent for the module, with short limits so the tests stay fast; the routed one
    serves the router's app (``--workers 1``)."""
    a = PortedAgent(tmp_path_factory.mktemp("agent"))
    workers = ["--workers", "1"] if request.param == "routed" else []
    a.start(
        "--http-port", str(a.http_port),
        "--metrics-port", str(a.metrics_port), "--metrics-host", "127.0.0.1",
        "--header-timeout", "0.5", "--body-timeout", "0.5", "--keepalive-timeout", "1",
        *workers,
    )  # fmt: skip
    yield a
    assert a.proc is not None
    kill_tree(a.proc)


def connect(agent: PortedAgent) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(GUARD)
    conn.connect(str(agent.socket))
    return conn


def read_to_close(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes; a hang fails the test."""
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server held the connection open; it sent {data[:200]!r}")
    except ConnectionResetError:
        pass
    finally:
        conn.close()
    return data


def oip_error(answer: bytes, status: int) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    return json.loads(body)["error"]


def still_serving(agent: PortedAgent) -> None:
    assert agent.request("GET", "/v2/health/live") == (200, {"live": True})


def test_a_request_head_sent_a_byte_at_a_time_gets_408_and_is_closed(agent: PortedAgent) -> None:
    """Slowloris: a header line every 50 ms keeps bytes flowing, but the head never ends."""
    conn = connect(agent)
    conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: node\r\n")
    deadline = time.monotonic() + GUARD
    while not select.select([conn], [], [], 0.05)[0]:
        if time.monotonic() > deadline:
            pytest.fail("the server waited for the head indefinitely")
        try:
            conn.sendall(b"X-Slow: 1\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
    assert "head did not arrive" in oip_error(read_to_close(conn), 408)
    still_serving(agent)


def test_a_connection_that_sends_nothing_is_closed(agent: PortedAgent) -> None:
    assert "head did not arrive" in oip_error(read_to_close(connect(agent)), 408)


def test_the_metrics_port_keeps_the_same_limits(agent: PortedAgent) -> None:
    """It listens on every address by default: anything on the network can reach it."""
    conn = socket.create_connection(("127.0.0.1", agent.metrics_port), timeout=GUARD)
    conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: node\r\n")
    assert "head did not arrive" in oip_error(read_to_close(conn), 408)


def test_an_idle_keepalive_connection_is_closed(agent: PortedAgent) -> None:
    conn = connect(agent)
    conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: node\r\n\r\n")
    answer = read_to_close(conn)  # the answer, then nothing: closed once idle
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1


def test_a_body_over_the_limit_is_refused_before_it_is_sent(agent: PortedAgent) -> None:
    conn = connect(agent)
    conn.sendall(
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: node\r\n"
        b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
    )
    answer = read_to_close(conn)  # no byte of the 100 MiB was sent
    assert "104857600 bytes is larger than the" in oip_error(answer, 413)
    assert b"Connection: close" in answer
    still_serving(agent)


def test_a_stalled_body_gets_408_and_is_dropped(agent: PortedAgent) -> None:
    conn = connect(agent)
    conn.sendall(
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: node\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"inputs": ['
    )
    assert "body did not arrive" in oip_error(read_to_close(conn), 408)
    still_serving(agent)


def ready_over_tcp(agent: PortedAgent) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{agent.http_port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=GUARD) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_deleted_socket_is_created_again(agent: PortedAgent) -> None:
    agent.socket.unlink()
    wait_for(agent.socket.exists, GUARD, "the node socket to be created again")
    still_serving(agent)
    assert ready_over_tcp(agent)[0] == 200


def test_readiness_says_no_while_the_socket_is_missing(agent: PortedAgent) -> None:
    # A folder in its place: the agent cannot bind it again, nor removes what is not a socket.
    agent.socket.unlink()
    agent.socket.mkdir()
    try:
        status, doc = ready_over_tcp(agent)
        assert status == 503 and "node socket is missing" in str(doc["error"])
    finally:
        agent.socket.rmdir()
    wait_for(lambda: ready_over_tcp(agent)[0] == 200, GUARD, "ready once the socket is back")
    still_serving(agent)


def run_agent(home: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    """``nodecache agent`` that is expected to end on its own."""
    return subprocess.run(
        [sys.executable, "-m", "nodecache.agent.cli", "agent",
         "--declarations", str(home.declarations), "--cache-dir", str(home.cache_dir),
         "--socket-dir", str(home.socket_dir), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("flag", "what"),
    [("--metrics-port", "metrics"), ("--http-port", "HTTP"), ("--grpc-port", "gRPC")],
)
def test_a_port_in_use_ends_the_agent_with_one_line(tmp_path: Path, flag: str, what: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    home = Agent(tmp_path / "agent")
    metrics = (
        ["--metrics-host", "127.0.0.1"] if flag == "--metrics-port" else ["--metrics-port", "0"]
    )
    try:
        last = one_line(run_agent(home, *metrics, flag, str(port)))
    finally:
        taken.close()
    assert last.startswith(f"nodecache: {what} port {port} ") and flag in last, last
    assert not home.socket.exists()  # nothing left listening


def test_a_second_agent_on_the_same_socket_ends_with_one_line(
    agent: PortedAgent, tmp_path: Path
) -> None:
    second = Agent(tmp_path / "second")
    second.socket_dir = agent.socket_dir
    last = one_line(run_agent(second, "--metrics-port", "0"))
    assert "already serving on" in last and "--socket-dir" in last, last
    still_serving(agent)  # its socket files are untouched
    assert (agent.socket_dir / "nodecache-grpc.sock").exists()
