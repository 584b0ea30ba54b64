"""Room on disk: what partial downloads hold, which are stale, and making room for a download.

The store measures what it holds under its space lock and hands plain numbers here; what
must go is decided by the pure :func:`nodecache.cache.quota.plan_room`, and removing one
victim is the store's callback, so this module knows nothing of the store's index or leases.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Container, Mapping, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from nodecache.cache.errors import InsufficientSpaceError
from nodecache.cache.fsutil import listdir, rmtree, tree_bytes
from nodecache.cache.layout import JOURNAL_NAME
from nodecache.cache.quota import Held, Refusal, format_bytes, plan_room
from nodecache.cache.uri import redact_uri

__all__ = [
    "PARTIAL_MAX_AGE",
    "PARTIAL_SUFFIX",
    "Room",
    "make_room",
    "partial_bytes",
    "partial_key",
    "room_left",
    "sweep_tmp",
]

PARTIAL_SUFFIX = ".partial"
"""``tmp/<key>.partial`` holds the download of ``<key>`` in progress or resumable."""
PARTIAL_MAX_AGE = 3 * 24 * 3600.0
"""A partial download whose journal is older than this is not resumed but deleted."""


def partial_key(name: str) -> str:
    """The model key of a ``tmp/`` entry named ``name``; "" if it is no partial download."""
    return name[: -len(PARTIAL_SUFFIX)] if name.endswith(PARTIAL_SUFFIX) else ""


def partial_bytes(tmp_dir: Path) -> dict[str, int]:
    """Bytes each partial download under ``tmp_dir`` holds on disk, by key."""
    out: dict[str, int] = {}
    for entry in listdir(tmp_dir):
        if entry.name.endswith(PARTIAL_SUFFIX) and entry.is_dir():
            out[entry.name[: -len(PARTIAL_SUFFIX)]] = tree_bytes(entry)
    return out


def sweep_tmp(
    tmp_dir: Path,
    running: Container[str],
    lock_if_free: Callable[[str], AbstractContextManager[bool]],
) -> None:
    """Delete everything under ``tmp_dir`` but partial downloads that may still resume.

    Kept: partials ``running`` in this process, partials with a journal younger than
    :data:`PARTIAL_MAX_AGE`, and partials another process holds the download lock of
    (``lock_if_free(key)`` yields whether this process got it; a partial is deleted only
    while it is held, so no download can start on it meanwhile).
    """
    now = time.time()
    for entry in listdir(tmp_dir):
        key = partial_key(entry.name)
        if not key:
            rmtree(entry)  # a folder being deleted
            continue
        if key in running:
            continue
        with contextlib.suppress(OSError):
            if now - (entry / JOURNAL_NAME).stat().st_mtime < PARTIAL_MAX_AGE:
                continue
        with lock_if_free(key) as free:
            if free:
                rmtree(entry)


@dataclass(frozen=True)
class Room:
    """What a download may still take, and the limit as its refusal names it."""

    free: int
    limit_text: str


def room_left(
    limit_bytes: int | None, published: int, partials: Mapping[str, int], disk_free: int
) -> Room:
    """Room under ``limit_bytes`` (None: the disk alone) given what is held already."""
    if limit_bytes is None:
        return Room(disk_free, "none")
    used = published + sum(partials.values())
    return Room(min(limit_bytes - used, disk_free), format_bytes(limit_bytes))


def make_room(
    uri: str,
    needed: int,
    room: Room,
    idle: MutableMapping[str, int],
    held: list[Held],
    evict: Callable[[Held], int],
) -> int:
    """Evict what :func:`plan_room` chooses until ``needed`` bytes fit; returns the room then.

    ``idle`` partials and ``held`` models (least recently used first) may go; ``evict``
    removes one and returns the bytes it freed (0 if it could not go after all, in which
    case the plan is made again without it). Raises :class:`InsufficientSpaceError` when
    even removing everything would not do.
    """
    free = room.free
    while True:  # once, unless something could not be removed after all
        plan = plan_room(needed, free, idle, held)
        if isinstance(plan, Refusal):
            raise _refusal(uri, plan, room.limit_text)
        if not plan.victims:
            return free
        for victim in plan.victims:
            if victim.partial:
                del idle[victim.key]
            else:
                held.remove(victim)
            free += evict(victim)


def _refusal(uri: str, plan: Refusal, limit_text: str) -> InsufficientSpaceError:
    evictable = f" (+{format_bytes(plan.evictable)} evictable)" if plan.evictable else ""
    return InsufficientSpaceError(
        f"{redact_uri(uri)} needs {format_bytes(plan.needed)}, limit {limit_text}, "
        f"free {format_bytes(max(plan.free, 0))}{evictable}",
        needed=plan.needed,
    )
