"""Label and field selectors, parsed as the apiserver parses them."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["field_matches", "label_matches"]

_SET = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(in|notin)\s*\(([^)]*)\)|(==|=|!=)\s*([\w./-]*))?\s*$")


def _terms(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    terms, depth, current = [], 0, ""
    for ch in selector:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    return [t for t in terms if t.strip()]


def label_matches(selector: str, labels: dict[str, str]) -> bool:
    """``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``, ``!a``; ANDed."""
    for term in _terms(selector):
        m = _SET.match(term)
        if m is None:
            raise ValueError(f"bad label selector term {term!r}")
        negate, key, set_op, values, op, value = m.groups()
        if negate and (set_op or op):
            raise ValueError(f"bad label selector term {term!r}")
        if set_op:
            allowed = {v.strip() for v in values.split(",")}
            ok = labels.get(key) in allowed if set_op == "in" else labels.get(key) not in allowed
        elif op:
            ok = (labels.get(key) == value) == (op != "!=")
        else:
            ok = (key in labels) != bool(negate)
        if not ok:
            return False
    return True


def field_matches(selector: str, obj: dict[str, Any]) -> bool:
    """``path=value``, ``path==value``, ``path!=value``; ANDed. Missing fields read as ''."""
    for term in _terms(selector):
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if m is None:
            raise ValueError(f"bad field selector term {term!r}")
        path, op, value = m.groups()
        current: Any = obj
        for part in path.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        text = (
            ""
            if current is None
            else str(current).lower()
            if isinstance(current, bool)
            else str(current)
        )
        if (text == value) != (op != "!="):
            return False
    return True
