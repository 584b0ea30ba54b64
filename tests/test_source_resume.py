"""Every source resumes after a kill, as S3 does: a fetching process killed mid-download
leaves its verified parts on disk, and the next fetch reads only what is missing.

Runs against the same real servers as ``test_source_conformance.py`` (its ``backend``
fixture). The child process kills itself at a known point (after three parts are complete
and journaled), so the test is exact about what a resume must not read again.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from oci_registry import registry_fixture  # noqa: F401 - the oci_registry fixture
from test_source_conformance import FILES, Backend, _prefix, backend, hf_hub, http_root  # noqa: F401

from nodecache.cache import MANIFEST_NAME, FetchOptions, ModelStore
from nodecache.cache.sources.base import Source

OPTIONS = dict(
    chunk_size=16 * 1024, part_size=64 * 1024, concurrency=1, fsync=False, journal_interval=0.01
)
COMPLETE_BEFORE_KILL = 3

# The child wraps every source's read_range: the call after COMPLETE_BEFORE_KILL parts
# waits until the journal records them, then the process dies as under an OOM kill.
CHILD = """
import asyncio, json, os, signal, sys, time
from pathlib import Path
from nodecache.cache import FetchOptions, ModelStore
from nodecache.cache.layout import JOURNAL_NAME
from nodecache.cache.room import PARTIAL_SUFFIX
from nodecache.cache.sources.base import Source

root, uri = Path(sys.argv[1]), sys.argv[2]
journal = root / "tmp" / (ModelStore.key_for(uri) + PARTIAL_SUFFIX) / JOURNAL_NAME
calls = 0

def journaled():
    try:
        files = json.loads(journal.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(len(entry["parts"]) for entry in files.values())

def wrap(read_range):
    def killing(self, *args, **kwargs):
        global calls
        calls += 1
        if calls > {complete}:
            deadline = time.monotonic() + 60
            while journaled() < {complete} and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return read_range(self, *args, **kwargs)
    return killing

def subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)

import nodecache.cache.sources  # every source module, so every subclass exists
for cls in {{Source, *subclasses(Source)}}:
    if "read_range" in vars(cls):
        cls.read_range = wrap(vars(cls)["read_range"])
asyncio.run(ModelStore(root, options=FetchOptions(**{options!r})).fetch(uri))
"""


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every range this process asks any source for."""
    asked: list[int] = []

    def wrap(read_range: Callable[..., int]) -> Callable[..., int]:
        def counting(self: Source, remote: Any, start: int, end: int | None, *rest: Any) -> int:
            reached = read_range(self, remote, start, end, *rest)
            asked.append(reached - start)
            return reached

        return counting

    for cls in {Source, *_subclasses(Source)}:
        if "read_range" in vars(cls):
            monkeypatch.setattr(cls, "read_range", wrap(vars(cls)["read_range"]))
    return asked


def test_a_killed_fetch_resumes_without_reading_its_parts_again(
    backend: Backend,  # noqa: F811 - the conformance fixture
    tmp_path: Path,
    bytes_read: list[int],
) -> None:
    prefix = _prefix()
    backend.put(prefix, FILES)
    uri = backend.uri(f"{prefix}/")
    root = tmp_path / "cache"
    script = CHILD.format(complete=COMPLETE_BEFORE_KILL, options=OPTIONS)
    child = subprocess.run(
        [sys.executable, "-c", script, str(root), uri], capture_output=True, timeout=120
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]

    store = ModelStore(root, options=FetchOptions(**OPTIONS))
    store.scan()  # a restart keeps resumable partials
    assert store.lookup(uri) is None, "nothing half-written is published"
    model = asyncio.run(store.fetch(uri))

    total = sum(len(data) for data in FILES.values())
    for rel, data in FILES.items():
        assert (model.path / rel).read_bytes() == data, rel
    manifest = json.loads((model.path / MANIFEST_NAME).read_text())
    assert sorted(entry["path"] for entry in manifest["files"]) == sorted(FILES)
    # The kill came after three complete parts: the resume does not read them again.
    assert sum(bytes_read) < total, (sum(bytes_read), total)
