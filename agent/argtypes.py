"""Argument types shared by the ``nodecache`` subcommands: a bad value is a usage error
that names what was expected, never a traceback."""

from __future__ import annotations

import argparse

from nodecache.agent.quantity import parse_quantity

__all__ = ["port", "positive_int", "quantity"]


def port(text: str) -> int:
    value = positive_int(text, minimum=0)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def positive_int(text: str, *, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def quantity(text: str) -> int:
    """A Kubernetes quantity (``512Mi``, ``2Gi``, ``1G``, plain bytes) as a positive int."""
    try:
        value = int(parse_quantity(text))
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a quantity such as 512Mi or 2Gi"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value
