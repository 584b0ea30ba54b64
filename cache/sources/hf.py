"""``hf://OWNER/REPO[@REVISION]`` (and KServe's ``hf://OWNER/REPO:REVISION``): a model
repository of the Hugging Face Hub.

``huggingface_hub`` makes the API calls: the revision (default ``main``) resolves to a commit
once (:attr:`HfSource.commit`), and the tree at that commit is listed recursively. Every byte
is then read at that commit, so a branch or tag moved during the download changes nothing,
through the shared ranged fetcher from ``{HF_ENDPOINT}/{repo}/resolve/{commit}/{path}``; LFS
files answer a redirect to the Hub's CDN, followed without the token (a presigned URL refuses
one). LFS files are verified by their sha256 (the LFS oid), the others by their git blob sha1.

Settings, from the cache's storage credentials and parameters first, then the environment as
``huggingface_hub`` reads it: ``HF_ENDPOINT``, ``HF_TOKEN`` (also the token file ``hf auth
login`` writes; an isolated source has only its own settings). ``include`` / ``exclude``:
comma-separated globs as ``snapshot_download``'s ``allow_patterns`` / ``ignore_patterns``
(``exclude: "original/*,*.pth"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, NoReturn
from urllib.parse import quote

from nodecache.cache.errors import FetchError
from nodecache.cache.hf_uri import parse_hf_uri
from nodecache.cache.sources.base import RemoteFile, Sink, Source, finish_listing
from nodecache.cache.sources.errors import SourceHttpError
from nodecache.cache.sources.httpclient import HttpRanges

__all__ = ["DEFAULT_ENDPOINT", "HfSource"]

DEFAULT_ENDPOINT = "https://huggingface.co"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_FILES = 1_000_000


class HfSource(Source):
    """``hf://OWNER/REPO[@REVISION]``: the repository's files at one commit."""

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        ref = parse_hf_uri(uri)
        self.repo_id, self.revision = ref.repo_id, ref.revision or "main"
        self.endpoint = (self.setting("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.token = self.credentials.get("HF_TOKEN") or (
            None if self.isolated else _stored_token()
        )
        self.include = _globs(self.credentials.get("include"))
        self.exclude = _globs(self.credentials.get("exclude"))
        self.commit: str | None = None
        """The commit the revision resolved to (set once, by the first listing)."""
        self.http = HttpRanges(self.timeout, cafile=self.setting("HF_HUB_CA_BUNDLE"))

    def close(self) -> None:
        self.http.close()

    @property
    def resolved(self) -> str | None:
        """What status shows: the commit, where the revision was a branch or tag."""
        return None if self.commit is None else f"commit {self.commit}"

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token or False, library_name="nodecache")

    def list_files(self) -> list[RemoteFile]:
        api = self._api()
        try:
            if self.commit is None:
                info = api.model_info(self.repo_id, revision=self.revision, timeout=self.timeout)
                if not isinstance(info.sha, str) or not _COMMIT.fullmatch(info.sha):
                    raise FetchError(
                        f"{self._where()} answered no commit for revision {self.revision!r}",
                        permanent=True,
                    )
                self.commit = info.sha
            entries = list(self._tree(api, self.commit))
        except Exception as exc:
            self._raise(exc)
        if not entries:
            raise FetchError(f"{self._where()} has no files", permanent=True)
        files = self._select(entries)
        if not files:
            raise FetchError(
                f"include/exclude leave none of the {len(entries)} files of {self._where()}",
                permanent=True,
            )
        return finish_listing(files, self.uri)

    def _tree(self, api: Any, commit: str) -> Iterator[RemoteFile]:
        from huggingface_hub.hf_api import RepoFile

        count = 0
        for entry in api.list_repo_tree(self.repo_id, revision=commit, recursive=True):
            if not isinstance(entry, RepoFile):
                continue
            count += 1
            if count > _MAX_FILES:
                raise FetchError(f"{self._where()} lists too many files", permanent=True)
            yield self._remote(entry, commit)

    def _remote(self, entry: Any, commit: str) -> RemoteFile:
        path, size, lfs = entry.path, entry.size, entry.lfs
        sha256 = lfs.sha256 if lfs is not None else None
        if lfs is not None:
            size = lfs.size
        if not isinstance(path, str) or not isinstance(size, int) or size < 0:
            raise FetchError(f"{self._where()} lists a malformed file entry", permanent=True)
        if sha256 is None and not re.fullmatch(r"[0-9a-f]{40}", str(entry.blob_id)):
            raise FetchError(f"{self._where()} lists {path!r} without a git oid", permanent=True)
        if sha256 is not None and not _SHA256.fullmatch(str(sha256)):
            raise FetchError(f"{self._where()} lists {path!r} without a sha256", permanent=True)
        url = f"{self.endpoint}/{self.repo_id}/resolve/{commit}/{quote(path)}"
        return RemoteFile(
            path,
            url,
            size,
            etag=sha256 or entry.blob_id,  # the content's identity: what resume compares
            sha256=sha256,
            git_sha1=None if sha256 else entry.blob_id,
        )

    def _select(self, files: list[RemoteFile]) -> list[RemoteFile]:
        if not self.include and not self.exclude:
            return files
        from huggingface_hub.utils import filter_repo_objects

        return list(
            filter_repo_objects(
                files,
                allow_patterns=self.include or None,
                ignore_patterns=self.exclude or None,
                key=lambda f: f.path,
            )
        )

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        return self.http.get(
            remote.url,
            start,
            end,
            sink,
            chunk_size=self.chunk_size,
            sign=self._sign if self.token else None,  # the Hub's origin only, not its CDN
            size=remote.size,
        )

    def _sign(self, method: str, url: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    # -- errors ---------------------------------------------------------------------------

    def _where(self) -> str:
        shown = self.endpoint if self.endpoint != DEFAULT_ENDPOINT else "the Hugging Face Hub"
        return f"{self.repo_id!r} on {shown}"

    def _raise(self, exc: Exception) -> NoReturn:
        """A ``huggingface_hub`` error as one a person can act on, without the token."""
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(exc, FetchError):
            raise exc
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        server = _header(response, "X-Error-Message")
        if isinstance(exc, GatedRepoError):
            message = (
                f"{self._where()} is gated: accept its conditions on the Hub with the account "
                f"whose HF_TOKEN the cache uses{'' if self.token else ' (no HF_TOKEN was given)'}"
            )
        elif isinstance(exc, RevisionNotFoundError):
            message = f"revision {self.revision!r} not found in {self._where()}"
        elif status == 401 and server == "Invalid credentials in Authorization header":
            message = f"{self._where()} refused HF_TOKEN: invalid credentials"
        elif isinstance(exc, RepositoryNotFoundError):
            hint = (
                "or it is private and HF_TOKEN lacks access to it"
                if self.token
                else "or it is private or gated and no HF_TOKEN was given"
            )
            message = f"repository {self._where()} not found ({hint})"
        elif isinstance(exc, HfHubHTTPError) and isinstance(status, int):
            raise self._masked(SourceHttpError(status, _header(response, "X-Error-Code"), server))
        else:
            # Transport errors (refused, reset, timed out) and anything else: the caller
            # classifies them (transient or not) from the exception chain.
            raise exc
        raise FetchError(self._mask(message), permanent=True) from None

    def _mask(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token and len(self.token) >= 4 else text

    def _masked(self, error: SourceHttpError) -> SourceHttpError:
        error.message = self._mask(error.message)
        error.args = (self._mask(str(error.args[0])),)
        return error


def _header(response: Any, name: str) -> str:
    headers = getattr(response, "headers", None)
    value = headers.get(name) if headers is not None else None
    return str(value)[:300] if value else ""


def _stored_token() -> str | None:
    """``HF_TOKEN`` from the environment, else the token file, as huggingface_hub finds it."""
    from huggingface_hub import get_token

    return get_token()


def _globs(value: str | None) -> list[str]:
    """Comma- or newline-separated glob patterns."""
    return [p.strip() for p in re.split(r"[,\n]", value or "") if p.strip()]
