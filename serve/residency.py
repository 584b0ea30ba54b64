"""Residency policy: which warm models to evict so another one fits.

Pure functions over plain records, so the policy is tested without loading anything.
The repository applies the decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Candidate", "choose_victims", "idle_models"]


@dataclass(frozen=True)
class Candidate:
    name: str
    bytes: int
    last_used: float
    pinned: bool = False
    busy: bool = False  # requests in flight, or loading


def choose_victims(warm: Iterable[Candidate], needed: int, free: int) -> list[str] | None:
    """Least-recently-used evictable models whose bytes make ``needed`` fit.

    Returns [] when it already fits, None when even evicting everything allowed would not.
    """
    if needed <= free:
        return []
    victims: list[str] = []
    for model in sorted(warm, key=lambda m: m.last_used):
        if model.pinned or model.busy:
            continue
        victims.append(model.name)
        free += model.bytes
        if needed <= free:
            return victims
    return None


def idle_models(warm: Sequence[Candidate], timeouts: dict[str, float], now: float) -> list[str]:
    """Models past their idle timeout (pinned and busy ones never are)."""
    return [
        m.name
        for m in warm
        if not m.pinned
        and not m.busy
        and m.name in timeouts
        and now - m.last_used >= timeouts[m.name]
    ]
