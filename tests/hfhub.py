"""A Hugging Face Hub on loopback for tests: the documented model API, faithful enough that
``huggingface_hub`` itself downloads from it byte for byte (``tests/test_source_hf.py``).

- ``GET /api/models/{repo}[/revision/{rev}]``: the revision's commit ``sha`` and ``siblings``.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true``: files (``oid`` = git blob
  sha1, ``size``, ``lfs: {oid: sha256, size, pointerSize}`` for LFS files) and folders,
  paginated by a ``Link: <...>; rel="next"`` header as the Hub does.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: small files served here with ``ETag`` (the
  blob sha1), ``X-Repo-Commit`` and Range; LFS files answer **302 to another origin** (the
  "CDN", a second port) with ``X-Repo-Commit``, ``X-Linked-Size`` and ``X-Linked-Etag`` (the
  sha256). The CDN serves presigned URLs: it answers 400 to any ``Authorization`` header
  (as S3 does to a presigned URL), 403 to a bad signature, and its ETag is not the sha256.
- Errors as the Hub gives them: ``X-Error-Code`` ``RepoNotFound`` (401 without a token, 404
  with one), ``RevisionNotFound``, ``EntryNotFound``; 401 "Invalid credentials in
  Authorization header" for a wrong token.

Revisions in URLs are quoted with ``safe=""`` (``refs%2Fpr%2F1``), so paths are parsed from
the raw request path, segment by segment.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import hmac
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web
from support import free_port

__all__ = ["FakeHub", "git_blob_sha1"]

LFS_PATTERNS = (
    "*.bin",
    "*.safetensors",
    "*.onnx",
    "*.pt",
    "*.pth",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "*.ckpt",
    "*.npy",
    "*.zip",
)
"""What the Hub's default ``.gitattributes`` puts in LFS (a subset)."""
LFS_THRESHOLD = 10 * 1024 * 1024
"""Larger files go to LFS whatever their name (the Hub refuses bigger plain git blobs)."""


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob: sha1 of ``b"blob <size>\\0"`` and the content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, data: bytes) -> bool:
    name = path.rsplit("/", 1)[-1]
    return len(data) > LFS_THRESHOLD or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)


def _pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    )


@dataclass
class Repo:
    """One model repository: commits (each a whole tree) and refs (branches and tags)."""

    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


class FakeHub:
    """The Hub on ``endpoint`` and its CDN on another port, in a thread of their own."""

    def __init__(self, token: str = "hf_fake_0123456789abcdef", page_size: int = 1000) -> None:
        self.token = token
        self.page_size = page_size
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        """LFS content by sha256 (what the CDN holds)."""
        self.corrupt: set[str] = set()
        """Paths (any repo) whose bytes are served with one byte flipped."""
        self.log: list[tuple[str, str, bool]] = []
        """(method, raw path, whether an Authorization header came) of every request."""
        self.key = b"cdn-signing-key"
        self.port = free_port()
        self.cdn_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://127.0.0.1:{self.cdn_port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runners: list[web.AppRunner] = []
        self.lock = threading.Lock()

    # -- content --------------------------------------------------------------------------

    def commit(
        self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", private: bool = False
    ) -> str:
        """Make ``files`` the whole tree of a new commit on ``branch``; return its sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            listing = "".join(f"{p}\0{git_blob_sha1(d)}\n" for p, d in sorted(files.items()))
            sha = hashlib.sha1(f"{repo_id}\n{len(repo.commits)}\n{listing}".encode()).hexdigest()
            repo.commits[sha] = dict(files)
            repo.refs[branch] = sha
            for path, data in files.items():
                if _is_lfs(path, data):
                    self.blobs[hashlib.sha256(data).hexdigest()] = data
            return sha

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        with self.lock:
            self.repos[repo_id].refs[name] = sha

    def requests(self, method: str | None = None, auth: bool | None = None) -> list[str]:
        """Raw paths requested, optionally of one method / with or without a token."""
        return [
            p
            for m, p, a in self.log
            if (method is None or m == method) and (auth is None or a == auth)
        ]

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> FakeHub:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        for handler, port in ((self._hub, self.port), (self._cdn, self.cdn_port)):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)

    # -- the Hub --------------------------------------------------------------------------

    async def _hub(self, request: web.Request) -> web.StreamResponse:
        self.log.append((request.method, request.raw_path, "Authorization" in request.headers))
        parts = urlsplit(request.raw_path)
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        auth = request.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {self.token}":
            message = "Invalid credentials in Authorization header"
            return _error(401, "", message)
        anonymous = auth is None
        with self.lock:
            if segments[:2] == ["api", "models"] and len(segments) >= 4:
                return self._api(request, segments[2:], parts.query, anonymous)
            if len(segments) >= 5 and segments[2] == "resolve":
                return self._resolve(request, segments, anonymous)
        return _error(404, "", "Sorry, we can't find the page you are looking for.")

    def _repo(self, repo_id: str, anonymous: bool) -> Repo | web.Response:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and anonymous):
            return _error(401 if anonymous else 404, "RepoNotFound", "Repository not found")
        return repo

    @staticmethod
    def _commit(repo: Repo, rev: str) -> str | web.Response:
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    def _api(
        self, request: web.Request, rest: list[str], query: str, anonymous: bool
    ) -> web.Response:
        repo_id = "/".join(rest[:2])
        repo = self._repo(repo_id, anonymous)
        if isinstance(repo, web.Response):
            return repo
        if len(rest) == 2 or (len(rest) == 4 and rest[2] == "revision"):
            sha = self._commit(repo, rest[3] if len(rest) == 4 else "main")
            if isinstance(sha, web.Response):
                return sha
            files = repo.commits[sha]
            return web.json_response(
                {
                    "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                    "id": repo_id,
                    "modelId": repo_id,
                    "author": rest[0],
                    "sha": sha,
                    "private": repo.private,
                    "gated": False,
                    "disabled": False,
                    "tags": [],
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                    "lastModified": "2025-01-01T00:00:00.000Z",
                    "createdAt": "2025-01-01T00:00:00.000Z",
                }
            )
        if len(rest) >= 4 and rest[2] == "tree" and request.method == "GET":
            sha = self._commit(repo, rest[3])
            if isinstance(sha, web.Response):
                return sha
            return self._tree(repo.commits[sha], request, "/".join(rest[4:]))
        return _error(404, "", "Sorry, we can't find the page you are looking for.")

    def _tree(self, files: dict[str, bytes], request: web.Request, under: str) -> web.Response:
        recursive = request.query.get("recursive", "false").lower() in ("true", "1")
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in files.items():
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :].split("/")
            for depth in range(1, len(rel)):  # the folders on the way
                folder = prefix + "/".join(rel[:depth])
                entries.setdefault(
                    folder,
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(folder.encode()).hexdigest(),
                        "size": 0,
                        "path": folder,
                    },
                )
                if not recursive:
                    break
            if len(rel) > 1 and not recursive:
                continue
            entries[path] = _file_entry(path, data)
        if prefix and not entries:
            return _error(404, "EntryNotFound", f"{under} does not exist on this revision")
        ordered = [entries[k] for k in sorted(entries)]
        start = (
            int(base64.urlsafe_b64decode(request.query["cursor"]))
            if "cursor" in request.query
            else 0
        )
        page = ordered[start : start + self.page_size]
        headers = {}
        if start + self.page_size < len(ordered):
            cursor = base64.urlsafe_b64encode(str(start + self.page_size).encode()).decode()
            query = "&".join(f"{k}={v}" for k, v in request.query.items() if k != "cursor")
            url = f"{self.endpoint}{request.path_qs.split('?')[0]}?{query}&cursor={cursor}"
            headers["Link"] = f'<{url}>; rel="next"'
        return web.Response(body=json.dumps(page), content_type="application/json", headers=headers)

    def _resolve(
        self, request: web.Request, segments: list[str], anonymous: bool
    ) -> web.StreamResponse:
        repo_id, rev, path = "/".join(segments[:2]), segments[3], "/".join(segments[4:])
        repo = self._repo(repo_id, anonymous)
        if isinstance(repo, web.Response):
            return repo
        sha = self._commit(repo, rev)
        if isinstance(sha, web.Response):
            return sha
        data = repo.commits[sha].get(path)
        if data is None:
            return _error(404, "EntryNotFound", f'{path} does not exist on "{rev}"')
        headers = {"X-Repo-Commit": sha}
        if _is_lfs(path, data):
            digest = hashlib.sha256(data).hexdigest()
            expires = "3600"
            sig = hmac.new(self.key, f"{digest}:{expires}".encode(), "sha256").hexdigest()
            name = quote(path.rsplit("/", 1)[-1])
            location = f"{self.cdn}/repos/{digest}?name={name}&X-Expires={expires}&X-Sig={sig}"
            headers.update(
                {
                    "Location": location,
                    "X-Linked-Size": str(len(data)),
                    "X-Linked-Etag": f'"{digest}"',
                    "ETag": f'"{git_blob_sha1(_pointer(data))}"',
                }
            )
            return web.Response(
                status=302, headers=headers, text=f"Found. Redirecting to {location}"
            )
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        return _ranged(request, self._served(path, data), headers)

    def _served(self, path: str, data: bytes) -> bytes:
        if path.rsplit("/", 1)[-1] in self.corrupt or path in self.corrupt:
            return data[:-1] + bytes([data[-1] ^ 0xFF]) if data else b"x"
        return data

    # -- the CDN --------------------------------------------------------------------------

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.log.append((request.method, request.raw_path, "Authorization" in request.headers))
        if "Authorization" in request.headers:
            return _s3_error(400, "InvalidArgument", "Only one auth mechanism allowed")
        match = re.fullmatch(r"/repos/([0-9a-f]{64})", request.path)
        digest = match.group(1) if match else ""
        expires = request.query.get("X-Expires", "")
        want = hmac.new(self.key, f"{digest}:{expires}".encode(), "sha256").hexdigest()
        if not hmac.compare_digest(want, request.query.get("X-Sig", "")):
            return _s3_error(403, "AccessDenied", "Request has invalid signature")
        with self.lock:
            data = self.blobs.get(digest)
            name = unquote(request.query.get("name", ""))
            if data is not None:
                data = self._served(name, data)
        if data is None:
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        return _ranged(request, data, {"ETag": etag, "Content-Type": "application/octet-stream"})


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    if _is_lfs(path, data):
        pointer = _pointer(data)
        return {
            "type": "file",
            "oid": git_blob_sha1(pointer),
            "size": len(data),
            "path": path,
            "lfs": {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": len(pointer),
            },
        }
    return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}


def _ranged(request: web.Request, data: bytes, headers: dict[str, str]) -> web.Response:
    """``data`` whole (200) or the one range asked for (206), as a static file server."""
    headers = {"Accept-Ranges": "bytes", **headers}
    size = len(data)
    header = request.headers.get("Range")
    status, body = 200, data
    if header:
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
        if not match or match.groups() == ("", ""):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        first, last = match.groups()
        if first:
            start, end = int(first), min(int(last) + 1 if last else size, size)
        else:
            start, end = max(size - int(last), 0), size
        if start >= size or start >= end:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        status, body = 206, data[start:end]
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(body))
        return web.Response(status=status, headers=headers)
    return web.Response(status=status, body=body, headers=headers)


def _error(status: int, code: str, message: str) -> web.Response:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return web.json_response({"error": message}, status=status, headers=headers)


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return web.Response(status=status, text=body, content_type="application/xml")
