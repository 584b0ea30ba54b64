"""The reconciler's metrics port, tried with raw sockets against ``nodecache reconciler`` in a
child process (on the fake API server): it listens on every address by default, so a slow,
idle or oversized request must not hold it, and /healthz keeps answering meanwhile."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubefake.server import FakeApiServer
from support import ROOT, free_port, kill_tree, wait_for

GUARD = 10.0  # seconds a test waits for the server to act before calling it a hang


class Reconciler:
    """``nodecache reconciler`` with short transport limits, so the tests stay fast."""

    def __init__(self, fake: FakeApiServer, home: Path) -> None:
        self.port = free_port()
        self.log = home / "reconciler.log"
        kubeconfig = fake.write_kubeconfig(home / "kubeconfig", "reconciler")
        command = [
            sys.executable, "-m", "nodecache.agent.cli", "reconciler",
            "--kubeconfig", str(kubeconfig), "--identity", "r1",
            "--metrics-port", str(self.port), "--metrics-host", "127.0.0.1",
            "--header-timeout", "0.5", "--body-timeout", "0.5", "--keepalive-timeout", "1",
            "--log-format", "json",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("POD_NAME", "POD_NAMESPACE")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        wait_for(self._answers, timeout=60, what="the reconciler's /healthz")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"reconciler exited {self.proc.returncode}:\n{self.log_text()}")
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=GUARD) as resp:
            return resp.status, resp.read()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=GUARD)

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def reconciler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reconciler]:
    with FakeApiServer(bookmark_interval=0.2) as fake:
        r = Reconciler(fake, tmp_path_factory.mktemp("reconciler"))
        yield r
        kill_tree(r.proc)


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


def error(answer: bytes, status: int) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    return json.loads(body)["error"]


def still_serving(reconciler: Reconciler) -> None:
    status, body = reconciler.get("/healthz")
    assert status == 200 and "leading" in json.loads(body)


def test_healthz_and_metrics_answer(reconciler: Reconciler) -> None:
    still_serving(reconciler)
    status, body = reconciler.get("/metrics")
    assert status == 200 and b"nodecache_reconciler_passes_total" in body


def test_a_request_head_sent_a_byte_at_a_time_gets_408_while_others_are_answered(
    reconciler: Reconciler,
) -> None:
    """Slowloris: a byte every 50 ms keeps the head coming, far inside every size limit, but
    it never ends; /healthz answers others meanwhile, and the slow peer is cut off."""
    conn = reconciler.connect()
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: r\r\nX-Slow: ")
    still_serving(reconciler)
    deadline = time.monotonic() + GUARD
    while not select.select([conn], [], [], 0.05)[0]:
        if time.monotonic() > deadline:
            pytest.fail("the server waited for the head indefinitely")
        try:
            conn.sendall(b"1")
        except (BrokenPipeError, ConnectionResetError):
            break
    assert "head did not arrive" in error(read_to_close(conn), 408)
    still_serving(reconciler)


def test_many_silent_connections_are_all_closed_and_do_not_stall_healthz(
    reconciler: Reconciler,
) -> None:
    silent = [reconciler.connect() for _ in range(64)]
    still_serving(reconciler)
    for conn in silent:
        assert "head did not arrive" in error(read_to_close(conn), 408)
    still_serving(reconciler)


def test_an_idle_keepalive_connection_is_closed(reconciler: Reconciler) -> None:
    conn = reconciler.connect()
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: r\r\n\r\n")
    answer = read_to_close(conn)  # the answer, then nothing: closed once idle
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/nowhere"])
def test_a_body_over_the_limit_is_refused_before_it_is_sent(
    reconciler: Reconciler, path: str
) -> None:
    conn = reconciler.connect()
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: r\r\nContent-Length: 104857600\r\n\r\n".encode())
    answer = read_to_close(conn)  # no byte of the 100 MiB was sent
    assert "104857600 bytes is larger than the 1024 byte limit" in error(answer, 413)
    assert b"Connection: close" in answer
    still_serving(reconciler)


def test_a_stalled_body_gets_408_and_is_dropped(reconciler: Reconciler) -> None:
    conn = reconciler.connect()
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: r\r\nContent-Length: 1000\r\n\r\n{")
    assert "body did not arrive" in error(read_to_close(conn), 408)
    still_serving(reconciler)


def test_an_oversized_request_head_is_refused(reconciler: Reconciler) -> None:
    conn = reconciler.connect()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused mid-send
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: r\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
    head, _, reason = read_to_close(conn).partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request"), head
    assert reason.startswith(b"Got more than 8190 bytes"), reason[:100]
    still_serving(reconciler)


def test_a_metrics_port_in_use_ends_the_reconciler_with_one_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with FakeApiServer() as fake:
            done = subprocess.run(
                [sys.executable, "-m", "nodecache.agent.cli", "reconciler",
                 "--kubeconfig", str(fake.write_kubeconfig(tmp_path / "kubeconfig")),
                 "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
    finally:
        taken.close()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nodecache: metrics port {port} is in use"), last
    assert last.endswith("; pass --metrics-port"), last
