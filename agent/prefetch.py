"""``nodecache prefetch URI``: put one model into the disk cache and print where it is.

Meant for init containers and shell scripts: progress goes to stderr (a live bar on a
terminal, a plain line every few seconds otherwise, so container logs stay readable), the
published folder is the last line of stdout, and the exit status says what happened:

    0   the model is in the cache (fetched now, or already there)
    1   the fetch failed (source unreachable, not found, access denied, corrupt bytes, I/O)
    2   the command line is wrong (bad URI, bad option)
    3   the model does not fit (quota or disk), even after evicting unused models
    130/143  interrupted by SIGINT/SIGTERM; verified parts are kept and the next run resumes

It uses the same :class:`cache.ModelStore` as the agent, so a folder shared with a running
agent is safe: one process downloads a source while the other waits, and a model fetched
here is a cache hit for the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from nodecache.agent.argtypes import positive_int, quantity
from nodecache.agent.settings import NodeOptions, add_option
from nodecache.cache import (
    MODEL_SIZE_TOLERANCE,
    CacheError,
    FetchOptions,
    InsufficientSpaceError,
    InvalidSourceError,
    ModelStore,
    StoredModel,
    format_bytes,
    redact_uri,
    validate_source_uri,
)
from nodecache.serve.loop import on_stop_signal

__all__ = ["ProgressReporter", "add_parser", "main", "run"]

DEFAULT_CACHE_DIR = Path(".nodecache") / "cache"
PROG = "nodecache prefetch"
EXIT_FETCH, EXIT_USAGE, EXIT_SPACE = 1, 2, 3
_DEFAULTS = FetchOptions()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prefetch`` command to ``subparsers`` (from ``add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "prefetch",
        help="download a model into the cache and print its folder",
        description="Download the model at URI into the cache folder (verified, resumable, "
        "parallel), show progress on stderr, and print the published local folder as the "
        "last line of stdout. A model already in the cache is not downloaded again. "
        "Credentials come from the usual environment variables (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, "
        "GOOGLE_APPLICATION_CREDENTIALS, STORAGE_EMULATOR_HOST, ...). Exit status: 0 done, "
        "1 fetch failed, 2 bad arguments, 3 does not fit, 130/143 interrupted (resumable).",
    )
    parser.add_argument(
        "uri",
        metavar="URI",
        help="s3://bucket/path, gs://bucket/path, http(s)://host/path (a trailing / means a "
        "folder index) or file:///path; a folder fetches every object under it",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        metavar="DIR",
        help="the cache folder, the same as the agent's --cache-dir (default: %(default)s)",
    )
    parser.add_argument(
        "--cache-size",
        type=quantity,
        metavar="QUANTITY",
        help="size limit of the whole cache folder, such as 100Gi; least recently used "
        "models are evicted to make room (default: no limit but the disk)",
    )
    parser.add_argument(
        "--model-size",
        type=quantity,
        metavar="QUANTITY",
        help="the model's declared size (a LocalModelCache's modelSize), such as 500Mi: a "
        f"source that lists or sends more than {MODEL_SIZE_TOLERANCE:.0%}% over it is "
        "refused and nothing is kept (default: no bound but the cache size and the disk)",
    )
    add_option(parser, NodeOptions, "cache_mode")  # the agent's, so the two cannot differ
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=_DEFAULTS.concurrency,
        metavar="N",
        help="ranged parts and files fetched at the same time (default: %(default)s)",
    )
    parser.add_argument(
        "--part-size",
        type=quantity,
        default=_DEFAULTS.part_size,
        metavar="QUANTITY",
        help="objects larger than this are fetched as parallel ranged parts of this size "
        "(default: 32Mi)",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "none"),
        default="auto",
        help="how progress is shown on stderr: a live bar (bar), a line every "
        "--progress-interval seconds (plain), or not at all; auto picks bar on a terminal "
        "and plain otherwise (default: %(default)s)",
    )
    parser.add_argument(
        "--progress-interval",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between plain progress lines (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="retries, resumes and evictions are logged at info (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m nodecache.agent.prefetch`` (the same command without the CLI)."""
    parser = argparse.ArgumentParser(prog="nodecache")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["prefetch", *(sys.argv[1:] if argv is None else argv)]))


def run(args: argparse.Namespace) -> int:
    """Fetch ``args.uri`` into ``args.cache_dir``; print the folder; return the exit status."""
    try:
        uri = validate_source_uri(args.uri)
        chunk = min(_DEFAULTS.chunk_size, args.part_size)
        options = FetchOptions(
            concurrency=args.concurrency, part_size=args.part_size, chunk_size=chunk
        )
    except (InvalidSourceError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    mode = args.progress
    if mode == "auto":
        mode = "bar" if _isatty(sys.stderr) else "plain"
    reporter = ProgressReporter(sys.stderr, mode, args.progress_interval)
    _setup_logging(reporter, args.log_level)
    try:
        model, hit = asyncio.run(_prefetch(uri, args, options, reporter))
    except _Interrupted as exc:
        reporter.close()
        return _fail(
            f"interrupted by {signal.Signals(exc.signum).name}; verified parts are kept, "
            "run again to resume",
            128 + exc.signum,
        )
    except InsufficientSpaceError as exc:
        reporter.close()
        return _fail(str(exc), EXIT_SPACE)
    except InvalidSourceError as exc:
        reporter.close()
        return _fail(str(exc), EXIT_USAGE)
    except CacheError as exc:
        reporter.close()
        return _fail(str(exc), EXIT_FETCH)
    except OSError as exc:  # the cache folder itself: permissions, read-only, ...
        reporter.close()
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"cache folder {args.cache_dir}: {exc.strerror or exc}{where}", EXIT_FETCH)
    except Exception as exc:  # one line, not a traceback, for init-container logs
        reporter.close()
        logging.getLogger(__name__).debug("prefetch failed", exc_info=True)
        return _fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_FETCH)
    reporter.finish(model, redact_uri(uri), hit)
    sys.stdout.write(f"{model.path.resolve()}\n")
    sys.stdout.flush()
    return 0


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


async def _prefetch(
    uri: str, args: argparse.Namespace, options: FetchOptions, reporter: ProgressReporter
) -> tuple[StoredModel, bool]:
    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(
        None,
        lambda: ModelStore(
            args.cache_dir,
            options=options,
            limit_bytes=args.cache_size,
            file_mode=args.cache_mode,
        ),
    )
    # Removes damaged models and stale partials (never those another process holds), so a
    # crashed earlier run cannot block the publish of this one. The folder's modes are the
    # agent's to tighten: a prefetch only creates its own files with --cache-mode.
    await loop.run_in_executor(None, lambda: store.scan(tighten=False))
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        task.cancel()

    remove_handlers = on_stop_signal(on_signal)
    ticker = asyncio.create_task(reporter.tick_forever())
    try:
        model = await store.fetch(uri, progress=reporter.update, max_bytes=args.model_size)
        return model, model.hit
    except asyncio.CancelledError:
        if received:
            raise _Interrupted(received[0]) from None
        raise
    finally:
        ticker.cancel()
        remove_handlers()


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    return code


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _setup_logging(reporter: ProgressReporter, level: str) -> None:
    """Store events (retries, resumes, evictions) as plain lines that do not break the bar."""
    handler = _ReporterHandler(reporter)
    # The summary line says it better than the store's own "published ..." event.
    handler.addFilter(lambda r: not str(r.msg).startswith("published "))
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # libraries (botocore, aiohttp) stay quiet
    for name in ("cache", __name__):
        logging.getLogger(name).setLevel(level.upper())


class _ReporterHandler(logging.Handler):
    def __init__(self, reporter: ProgressReporter) -> None:
        super().__init__()
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.reporter.message(self.format(record))
        except Exception:
            self.handleError(record)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressReporter:
    """Shows download progress on a stream: a live bar, periodic plain lines, or nothing.

    :meth:`update` is the store's progress callback; it is called from worker threads for
    every chunk, so it only records the numbers. Drawing happens on a timer
    (:meth:`tick_forever`), off the byte path. The rate is measured over the last few
    seconds, so the ETA follows the link as it is now, not the average since the start.
    """

    BAR_TICK = 0.1
    WINDOW = 3.0

    def __init__(self, stream: TextIO, mode: str, interval: float = 5.0) -> None:
        if mode not in ("bar", "plain", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.stream = stream
        self.mode = mode
        self.interval = interval
        self.started = time.monotonic()
        self._latest: tuple[int, int | None] | None = None
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._bar_shown = False
        self._last_plain = 0.0
        self._last_drawn: tuple[int, int | None] | None = None
        self._drawn_at = 0.0

    def update(self, done: int, total: int | None) -> None:
        self._latest = (done, total)  # one reference store: safe from any thread

    async def tick_forever(self) -> None:
        if self.mode == "none":
            return
        self._last_plain = time.monotonic()
        while True:
            await asyncio.sleep(self.BAR_TICK if self.mode == "bar" else min(1.0, self.interval))
            self.tick()

    def tick(self, now: float | None = None) -> None:
        """Sample the latest numbers and draw them if it is time to."""
        latest = self._latest
        if latest is None or self.mode == "none":
            return
        now = time.monotonic() if now is None else now
        self._sample(now, latest[0])
        if self.mode == "bar":
            stale = now - self._drawn_at >= 1.0  # keep the clock moving through a stall
            if latest != self._last_drawn or not self._bar_shown or stale:
                self._draw_bar(latest, now)
        elif now - self._last_plain >= self.interval:
            self._last_plain = now
            self._write(f"{PROG}: {self._describe(latest, now)}\n")

    def _sample(self, now: float, done: int) -> None:
        samples = self._samples
        if samples and done < samples[-1][1]:  # bytes un-counted after a retry: start over
            samples.clear()
        samples.append((now, done))
        while len(samples) > 2 and now - samples[1][0] >= self.WINDOW:
            samples.popleft()

    def rate(self) -> float | None:
        """Bytes per second over the last few seconds; None until two samples exist."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def _describe(self, latest: tuple[int, int | None], now: float) -> str:
        done, total = latest
        rate = self.rate()
        parts = []
        if total:
            parts.append(f"{100 * done // total:3d}%")
            parts.append(f"{format_bytes(done)} / {format_bytes(total)}")
        else:
            parts.append(format_bytes(done))
        parts.append(f"{format_bytes(rate)}/s" if rate is not None else "-- MiB/s")
        if total and rate:
            parts.append(f"ETA {_duration(max(total - done, 0) / rate)}")
        elif total:
            parts.append("ETA --:--")
        parts.append(f"elapsed {_duration(now - self.started)}")
        return "  ".join(parts)

    def _draw_bar(self, latest: tuple[int, int | None], now: float) -> None:
        text = self._describe(latest, now)
        width = self._columns()
        done, total = latest
        room = width - len(text) - 4
        if total and room >= 10:
            cells = min(room, 40)
            filled = min(cells, cells * done // total)
            text = f"[{'#' * filled}{'.' * (cells - filled)}] {text}"
        self._last_drawn, self._drawn_at = latest, now
        self._write(f"\r{text[: width - 1]}\x1b[K", bar=True)

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):
            return 80

    def _write(self, text: str, *, bar: bool = False) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()
            self._bar_shown = bar

    def message(self, line: str) -> None:
        """Print a log line; on a terminal, clear the bar first (it is redrawn next tick)."""
        with self._lock:
            if self._bar_shown:
                self.stream.write("\r\x1b[K")
                self._bar_shown = False
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line so what follows starts on a fresh one."""
        with self._lock:
            if self._bar_shown:
                self.stream.write("\n")
                self.stream.flush()
                self._bar_shown = False

    def finish(self, model: StoredModel, shown_uri: str, hit: bool) -> None:
        """Last progress line, then a summary of what is on disk."""
        now = time.monotonic()
        size = model.size_bytes
        if self.mode == "bar" and not hit:
            self._samples.clear()
            self._samples.extend([(self.started, 0), (now, size)])  # final: average rate
            self._draw_bar((size, size), now)
        self.close()
        if self.mode == "none":
            return
        files = f"{len(model.files)} file{'s' if len(model.files) != 1 else ''}"
        if hit:
            summary = f"{shown_uri} is already in the cache ({format_bytes(size)}, {files})"
        else:
            elapsed = max(now - self.started, 1e-9)
            summary = (
                f"fetched {shown_uri}: {format_bytes(size)}, {files} in {elapsed:.1f}s "
                f"({format_bytes(size / elapsed)}/s), verified"
            )
        self.message(f"{PROG}: {summary}")


if __name__ == "__main__":
    sys.exit(main())
