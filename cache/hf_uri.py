"""``hf://OWNER/REPO[@REVISION]`` and KServe's ``hf://OWNER/REPO:REVISION``: Hugging Face
model URIs, parsed in one place for :mod:`nodecache.cache.uri` (validation, normal form) and
the Hugging Face source.

Repository ids follow the Hub's rules (as ``huggingface_hub``'s ``validate_repo_id``):
letters, digits, ``-``, ``_`` and ``.``, at most 96 characters a part, no ``--`` or ``..``.
A revision is a branch, a tag or a commit; it may hold ``/`` (``refs/pr/1``) but nothing git
refuses in a ref name. The normal form writes the revision after ``@`` and leaves it out
when none was given (the repository's ``main``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nodecache.cache.errors import InvalidSourceError

__all__ = ["HfUri", "parse_hf_uri"]

_FORMS = "write hf://OWNER/REPO, hf://OWNER/REPO@REVISION or hf://OWNER/REPO:REVISION"
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[^\s~^:?*\[\\]{1,255}")


@dataclass(frozen=True)
class HfUri:
    """A model repository and the revision asked for (None: ``main``)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_hf_uri(text: str, shown: str | None = None) -> HfUri:
    """Parse ``text`` (already free of control characters); ``shown`` is its redacted form
    for messages. Raises :class:`InvalidSourceError`."""
    shown = text if shown is None else shown
    if text[:5].lower() != "hf://":
        raise InvalidSourceError(f"not an hf:// URI: {shown!r}")
    rest = text[5:]
    if "?" in rest or "#" in rest:
        raise InvalidSourceError(f"unexpected '?' or '#' in {shown!r}; {_FORMS}")
    owner, _, rest = rest.partition("/")
    match = re.fullmatch(r"([^/@:]*)(?:[@:](.*))?", rest, re.DOTALL)
    if match is None:
        raise InvalidSourceError(
            f"{shown!r} names a path inside a repository; {_FORMS} and choose files with "
            "the storage parameters include/exclude"
        )
    name, revision = match.group(1), match.group(2)
    for part in (owner, name):
        if not _PART.fullmatch(part) or "--" in part or ".." in part or part.endswith("."):
            raise InvalidSourceError(
                f"invalid repository id {owner + '/' + name!r} in {shown!r}; {_FORMS} "
                "(letters, digits, '-', '_', '.'; no '--' or '..')"
            )
    if revision is not None:
        bad = (
            not _REVISION.fullmatch(revision)
            or ".." in revision
            or "//" in revision
            or "@{" in revision
            or revision.startswith("/")
            or revision.endswith(("/", ".", ".lock"))
        )
        if bad:
            raise InvalidSourceError(
                f"invalid revision {revision!r} in {shown!r}; name a branch, tag or commit"
            )
    return HfUri(f"{owner}/{name}", revision)
