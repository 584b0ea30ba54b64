"""Kubernetes quantities (``512Mi``, ``2Gi``, ``1.5G``, ``100m``) as exact decimals.

The official client's ``kubernetes.utils.quantity.parse_quantity`` does this, but importing
it loads the whole client package (about 40 MB of resident memory on every node, for an
agent that runs standalone without it). This parser accepts what that one does for the
grammar Kubernetes defines, and is checked against it in tests/test_quantity.py.
"""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = ["parse_quantity"]

_DECIMAL = {"k": 1, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6, "m": -1, "u": -2, "n": -3}
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_SCALE: dict[str, Decimal] = {
    **{suffix: Decimal(1000) ** power for suffix, power in _DECIMAL.items()},
    **{suffix: Decimal(1024) ** power for suffix, power in _BINARY.items()},
}
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    r"(?P<suffix>[KMGTPE]i|[numkKMGTPE]?)"
)


def parse_quantity(value: str | int | float | Decimal) -> Decimal:
    """The quantity as a Decimal; ValueError if it is not one."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int | float | Decimal):
        return Decimal(value)
    match = _QUANTITY.fullmatch(str(value))
    if match is None:
        raise ValueError(f"{str(value)[:40]!r} is not a quantity")
    number = Decimal(match["number"])  # exact, whatever its exponent
    if not match["suffix"]:
        return number
    try:
        return number * _SCALE[match["suffix"]]
    except ArithmeticError:  # past what a Decimal holds (decimal.Overflow)
        raise ValueError(f"{str(value)[:40]!r} is out of range") from None
