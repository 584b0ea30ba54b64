"""Argument types shared by the ``nodecache`` subcommands: a bad value is a usage error
that names what was expected, never a traceback."""

from __future__ import annotations

import argparse

from nodecache.agent.quantity import parse_quantity
from nodecache.cache.perms import parse_file_mode

__all__ = [
    "address",
    "file_mode",
    "group",
    "non_negative_int",
    "port",
    "positive_int",
    "quantity",
    "seconds",
]


def address(text: str) -> tuple[str, int]:
    """``[HOST]:PORT`` as (host, port); no host means every address (``:8080``), and an
    IPv6 host goes in brackets (``[::1]:8080``)."""
    host, colon, number = text.rpartition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST]:PORT, e.g. :8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"put an IPv6 address in brackets: [{host}]:{number}")
    return host, port(number)


def port(text: str) -> int:
    value = positive_int(text, minimum=0)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def non_negative_int(text: str) -> int:
    return positive_int(text, minimum=0)


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


def seconds(text: str) -> float:
    """A timeout: more than nothing, less than a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and less than a day, got {text}")
    return value


def group(text: str) -> int:
    """A group by name or id, as its id."""
    import grp

    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


def file_mode(text: str) -> int:
    """An octal file mode such as 0640."""
    try:
        return parse_file_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
