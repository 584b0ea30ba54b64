"""The event loop servers run on (uvloop's C transports where installed), and how a
server hears that it should stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["STOP_SIGNALS", "on_stop_signal", "serve_forever"]

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def serve_forever(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when available: its transports take a large share of the
    per-request cost off the pure-Python ones (MLServer and KServe run on it too)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def on_stop_signal(action: asyncio.Event | Callable[[int], object]) -> Callable[[], None]:
    """On SIGTERM or SIGINT, set the event (or call ``action(signum)``); returns what removes
    the handlers again. Only the main thread can handle signals: elsewhere (an agent run in
    a test's thread) nothing is installed and the caller stops some other way."""
    loop = asyncio.get_running_loop()
    callback = (lambda _: action.set()) if isinstance(action, asyncio.Event) else action
    installed: list[int] = []
    with contextlib.suppress(RuntimeError, ValueError):  # not on the main thread
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, callback, signum)
            installed.append(signum)

    def remove() -> None:
        for signum in installed:
            loop.remove_signal_handler(signum)

    return remove
