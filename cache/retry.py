"""Retrying one read (a part or a listing) with backoff, and stopping when the fetch aborts.

A transient error (reset, timeout, 5xx, throttling; :func:`nodecache.cache.sources.is_transient`)
is retried with exponential backoff and full jitter; anything else, or running out of
retries, is raised to the caller. Every wait ends early when the fetch's abort event is set.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from nodecache.cache.errors import CacheError, FetchError
from nodecache.cache.options import FetchOptions
from nodecache.cache.sources import is_transient, translate_error
from nodecache.cache.uri import redact_uri

__all__ = ["Aborted", "backoff_delay", "ensure_fetch_error", "retrying"]


class Aborted(Exception):
    """Internal: another part of the same fetch failed, or the fetch was cancelled."""


def backoff_delay(attempt: int, options: FetchOptions) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): exponential with full jitter."""
    ceiling = min(options.backoff_max, options.backoff_base * (2 ** (attempt - 1)))
    return random.uniform(ceiling / 2, ceiling)


def retrying(
    fn: Callable[[], Any],
    options: FetchOptions,
    abort: threading.Event,
    *,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
) -> Any:
    """Call ``fn`` until it succeeds, a permanent error occurs or retries run out. Blocking."""
    attempt = 0
    while True:
        if abort.is_set():
            raise Aborted
        try:
            return fn()
        except Aborted:
            raise
        except Exception as exc:
            attempt += 1
            if attempt > options.retries or not is_transient(exc):
                raise
            delay = backoff_delay(attempt, options)
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            if abort.wait(delay):
                raise Aborted from None


def ensure_fetch_error(exc: BaseException, uri: str) -> CacheError:
    """Whatever went wrong, a :class:`CacheError` for the caller."""
    if isinstance(exc, CacheError):
        return exc
    if isinstance(exc, Aborted):
        return FetchError(f"fetching {redact_uri(uri)} was aborted")
    return translate_error(exc, uri)
