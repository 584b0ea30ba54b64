"""``nodecache prefetch`` as a real child process against HTTP servers on loopback.

What an init container relies on: the folder is the last line of stdout, the exit status
says what happened, errors are one readable line, a second run does not download again,
and progress is a live bar on a terminal but plain lines in a log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from support import ROOT, SlowHttpSource, kill_tree, wait_for

from nodecache.agent.prefetch import ProgressReporter
from nodecache.cache import MANIFEST_NAME

MiB = 1 << 20


def prefetch_command() -> list[str]:
    """``nodecache prefetch`` through the CLI once it is wired there, else the module."""
    from nodecache.agent.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["prefetch", "file:///x"])
    except SystemExit:
        return [sys.executable, "-m", "nodecache.agent.prefetch"]
    return [sys.executable, "-m", "nodecache.agent.cli", "prefetch"]


def run_prefetch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefetch_command(), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


class StaticServer:
    """An aiohttp server in a thread serving a folder with index pages; counts GETs."""

    def __init__(self, docroot: Path) -> None:
        self.docroot = docroot
        self.gets: collections.Counter[str] = collections.Counter()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _start(self) -> None:
        @web.middleware
        async def count(request: web.Request, handler):  # type: ignore[no-untyped-def]
            if request.method == "GET":
                self.gets[request.path] += 1
            return await handler(request)

        app = web.Application(middlewares=[count])
        app.router.add_static("/models/", self.docroot, show_index=True)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/models/"

    def __enter__(self) -> StaticServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def make_model(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"layers": 2}\n',
        "weights/model.safetensors": os.urandom(1_500_001),
        "tokenizer/vocab.txt": b"a\nb\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_model(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[StaticServer, dict[str, bytes]]]:
    docroot = tmp_path / "docroot"
    files = make_model(docroot / "tiny")
    with StaticServer(docroot) as server:
        yield server, files


def test_folder_is_fetched_and_printed_as_the_last_stdout_line(
    tmp_path: Path, served: tuple[StaticServer, dict[str, bytes]]
) -> None:
    server, files = served
    cache = tmp_path / "cache"

    done = run_prefetch(f"{server.url}tiny/", "--cache-dir", str(cache))

    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.splitlines()[-1])
    assert folder.is_absolute() and folder.parent == (cache / "models").resolve()
    assert read_model(folder) == files
    assert "fetched" in done.stderr and "verified" in done.stderr
    assert "\r" not in done.stderr  # not a terminal: plain lines only
    assert "Traceback" not in done.stderr


def test_second_run_is_a_cache_hit_without_the_network(
    tmp_path: Path, served: tuple[StaticServer, dict[str, bytes]]
) -> None:
    server, _files = served
    cache = tmp_path / "cache"
    first = run_prefetch(f"{server.url}tiny/", "--cache-dir", str(cache))
    assert first.returncode == 0, first.stderr
    gets = sum(server.gets.values())

    second = run_prefetch(f"{server.url}tiny/", "--cache-dir", str(cache))

    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]
    assert "already in the cache" in second.stderr
    assert sum(server.gets.values()) == gets


def test_bad_uri_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    done = run_prefetch("ftp://example.com/model/", "--cache-dir", str(tmp_path / "cache"))

    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("nodecache prefetch: error:")
    assert "unknown scheme 'ftp'" in lines[0]


def test_missing_source_exits_1_and_publishes_nothing(
    tmp_path: Path, served: tuple[StaticServer, dict[str, bytes]]
) -> None:
    server, _files = served
    cache = tmp_path / "cache"

    done = run_prefetch(f"{server.url}nothing-here.bin", "--cache-dir", str(cache))

    assert done.returncode == 1
    assert done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("nodecache prefetch: error:") and "nothing-here.bin" in last
    assert "Traceback" not in done.stderr
    assert list((cache / "models").iterdir()) == []


def test_model_larger_than_the_cache_size_exits_3(
    tmp_path: Path, served: tuple[StaticServer, dict[str, bytes]]
) -> None:
    server, _files = served

    done = run_prefetch(
        f"{server.url}tiny/", "--cache-dir", str(tmp_path / "cache"), "--cache-size", "1Mi"
    )

    assert done.returncode == 3
    assert "needs 1.4 MiB, limit 1.0 MiB" in done.stderr
    assert server.gets["/models/tiny/weights/model.safetensors"] == 0  # refused up front


def test_invalid_option_is_a_usage_error(tmp_path: Path) -> None:
    done = run_prefetch("file:///x", "--cache-dir", str(tmp_path), "--part-size", "lots")

    assert done.returncode == 2
    assert "is not a quantity" in done.stderr


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(2 * MiB)
    (src / "model.bin").write_bytes(data)
    with SlowHttpSource(src, bytes_per_second=1 * MiB) as slow:
        done = run_prefetch(
            f"{slow.url}model.bin",
            "--cache-dir", str(tmp_path / "cache"),
            "--progress-interval", "0.2",
            "--part-size", "512Ki",  # reads (and progress) in 512 KiB steps
        )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.splitlines()[-1]) / "model.bin").read_bytes() == data
    progress = [line for line in done.stderr.splitlines() if "ETA" in line]
    assert progress, done.stderr
    assert all(line.startswith("nodecache prefetch: ") for line in progress)
    assert "/ 2.0 MiB" in progress[-1]
    assert "\r" not in done.stderr


def test_progress_bar_redraws_one_line_on_a_terminal(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(os.urandom(2 * MiB))
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with SlowHttpSource(src, bytes_per_second=1 * MiB) as slow:
            proc = subprocess.Popen(
                [*prefetch_command(), f"{slow.url}model.bin", "--cache-dir",
                 str(tmp_path / "cache"), "--part-size", "512Ki"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, text=True,
            )  # fmt: skip
            os.close(slave)
            out, _ = proc.communicate(timeout=120)
        reader.join(10)
    finally:
        os.close(master)

    assert proc.returncode == 0
    assert Path(out.splitlines()[-1]).is_dir()
    screen = b"".join(chunks).decode(errors="replace")
    assert screen.count("\r") >= 2, screen
    assert "[" in screen and "iB/s" in screen and "ETA" in screen
    assert "100%" in screen
    # The bar's line is ended before the summary, which starts on a fresh line.
    assert re.search(r"\x1b\[K\r?\nnodecache prefetch: fetched ", screen), screen


def test_sigterm_stops_cleanly_and_the_next_run_completes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * MiB)
    (src / "model.bin").write_bytes(data)
    cache = tmp_path / "cache"
    log = tmp_path / "stderr.txt"
    with SlowHttpSource(src, bytes_per_second=512 * 1024) as slow:
        uri = f"{slow.url}model.bin"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [*prefetch_command(), uri, "--cache-dir", str(cache), "--progress-interval",
                 "0.1", "--part-size", "256Ki"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
            try:
                wait_for(lambda: "ETA" in log.read_text(), 60, "a progress line")
                proc.send_signal(signal.SIGTERM)
                out, _ = proc.communicate(timeout=60)
            finally:
                kill_tree(proc)  # type: ignore[arg-type]
        stopped = log.read_text()

        assert proc.returncode == 128 + signal.SIGTERM
        assert out == ""
        assert "interrupted by SIGTERM" in stopped and "Traceback" not in stopped
        assert list((cache / "models").iterdir()) == []

        again = run_prefetch(uri, "--cache-dir", str(cache), "--progress", "none")

    assert again.returncode == 0, again.stderr
    assert (Path(again.stdout.splitlines()[-1]) / "model.bin").read_bytes() == data


def test_reporter_rate_and_eta_follow_recent_progress() -> None:
    out = io.StringIO()
    reporter = ProgressReporter(out, "plain", interval=1.0)
    reporter._last_plain = 0.0
    reporter.update(0, 100 * MiB)
    reporter.tick(now=0.5)
    reporter.update(10 * MiB, 100 * MiB)
    reporter.tick(now=1.5)

    line = out.getvalue().strip()
    assert line.startswith("nodecache prefetch:  10%  10.0 MiB / 100.0 MiB  10.0 MiB/s")
    assert "ETA 0:09" in line


def test_the_init_container_loads_no_serving_stack() -> None:
    """``nodecache prefetch`` runs in every pod's init container: its start-up must not pay
    for aiohttp, numpy or the runtimes it never uses (0.6 CPU-s of ~1 here)."""
    probe = (
        "import sys, nodecache.agent.cli, nodecache.agent.prefetch; "
        "heavy = ('aiohttp', 'awscrt', 'numpy', 'onnxruntime', 'torch', 'kubernetes'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
