"""Our quantity parser against the official client's, on the grammar Kubernetes defines."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.utils.quantity import parse_quantity as official

from nodecache.agent.quantity import parse_quantity

numbers = st.from_regex(r"[+-]?(\d{1,8}(\.\d{0,4})?|\.\d{1,4})([eE][+-]?\d{1,2})?", fullmatch=True)
suffixes = st.sampled_from(["", "n", "u", "m", "k", "K", "M", "G", "T", "P", "E",
                            "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"])  # fmt: skip


@settings(max_examples=300, derandomize=True, database=None)
@given(number=numbers, suffix=suffixes)
def test_the_same_value_as_the_official_client(number: str, suffix: str) -> None:
    assert parse_quantity(number + suffix) == official(number + suffix)


@settings(max_examples=300, derandomize=True, database=None)
@given(text=st.text(alphabet="0123456789.eE+-numkKMGTPEi xNa_", max_size=8))
def test_anything_else_is_refused_or_agrees(text: str) -> None:
    try:
        ours = parse_quantity(text)
    except ValueError:
        return  # the official client may be laxer (it passes the text to Decimal)
    assert ours == official(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("512Mi", 512 << 20), ("2Gi", 2 << 30), ("1.5G", 1_500_000_000), ("100m", Decimal("0.1")),
     ("1e3", 1000), ("7", 7), ("1E", 10**18)],
)  # fmt: skip
def test_known_values(text: str, value: Decimal | int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Mi", "1ki", "1 Mi", "1Mb", "NaN", "inf", "1e999999Ei"])
def test_not_quantities(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)
