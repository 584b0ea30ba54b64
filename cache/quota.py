"""Quota: what a model may take, and what must go so a download fits.

:func:`plan_room` is pure, over plain records, so the eviction policy is tested without a
disk (as :mod:`nodecache.serve.residency` is for device memory); the store applies it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "MODEL_SIZE_TOLERANCE",
    "Held",
    "Refusal",
    "RoomPlan",
    "allowance",
    "format_bytes",
    "plan_room",
    "size_rule",
]

MODEL_SIZE_TOLERANCE = 0.25
"""How far past its declared size (``modelSize``) a model may go: declarations are often
rounded ("500Mi" for a 510 MiB model), so a quarter more is allowed; past that the download
stops and the partial copy is removed."""


@dataclass(frozen=True)
class Held:
    """Something on disk that may go to make room."""

    key: str
    bytes: int
    partial: bool = False
    """An idle partial download (``tmp/<key>.partial``) rather than a published model."""


@dataclass(frozen=True)
class RoomPlan:
    """What to remove, in order, so the download fits (empty: it fits already)."""

    victims: tuple[Held, ...]


@dataclass(frozen=True)
class Refusal:
    """The download cannot fit, even after removing everything that may go."""

    needed: int
    free: int
    evictable: int


def plan_room(
    needed: int, free: int, partials: Mapping[str, int], models: Sequence[Held]
) -> RoomPlan | Refusal:
    """What must go so ``needed`` bytes fit in ``free``: idle partial downloads first (by
    key), then published ``models`` in the order given (least recently used first), only as
    many as needed."""
    order = [Held(key, n, partial=True) for key, n in sorted(partials.items())]
    order += models
    evictable = sum(h.bytes for h in order)
    if needed > free + evictable:
        return Refusal(needed, free, evictable)
    victims: list[Held] = []
    for held in order:
        if needed <= free:
            break
        victims.append(held)
        free += held.bytes
    return RoomPlan(tuple(victims))


def allowance(max_bytes: int | None) -> int | None:
    """The most a model declared as ``max_bytes`` may take on disk."""
    return None if max_bytes is None else int(max_bytes * (1 + MODEL_SIZE_TOLERANCE))


def size_rule(max_bytes: int | None) -> str:
    """``'64.0 MiB (80.0 MiB with the 25% tolerance)'``, for error messages."""
    most = allowance(max_bytes) or 0
    return (
        f"{format_bytes(max_bytes or 0)} ({format_bytes(most)} with the "
        f"{MODEL_SIZE_TOLERANCE:.0%} tolerance)"
    )


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
