"""The event loop servers run on: uvloop's (C transports) where it is installed."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["serve_forever"]

T = TypeVar("T")


def serve_forever(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when available: its transports take a large share of the
    per-request cost off the pure-Python ones (MLServer and KServe run on it too)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
