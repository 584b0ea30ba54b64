"""Re-verify cached models against their local digests, at memory bandwidth.

Every chunk of every file is hashed again (xxh3-128, :mod:`nodecache.cache.localdigest`)
and compared with the digest recorded when the file was verified against its source. Chunks
are hashed in parallel threads, mapped from the page cache (xxhash releases the GIL). Read
only: nothing is written, no lock is taken, so it is safe while an agent runs (a model the
agent removes meanwhile is reported as gone, not as corrupt).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nodecache.cache.diskio import map_range
from nodecache.cache.fsutil import listdir
from nodecache.cache.localdigest import new_hash
from nodecache.cache.manifest import StoredFile, StoredModel, load_model

__all__ = ["Verdict", "default_threads", "drop_corrupt", "find_models", "verify_model"]

log = logging.getLogger(__name__)


def default_threads() -> int:
    """One hashing thread per CPU this process may use, at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class Verdict:
    """What re-hashing one model found."""

    model: StoredModel
    corrupt: tuple[tuple[str, int, int], ...] = ()
    """``(path, start, end)`` of each chunk whose bytes differ from its digest (or that
    could not be read: a file shorter than recorded, gone, unreadable)."""
    unchecked: tuple[str, ...] = ()
    """Files with no check to re-run: no local digest (a manifest written before them) and
    no sha256 either (verified by a source CRC, which would need the source's part layout)."""
    bytes_hashed: int = 0
    gone: bool = False
    """The model was removed while it was checked (by an agent evicting it)."""

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.unchecked

    def describe(self) -> str:
        """One line for a person: ok, where it is corrupt, or what could not be checked."""
        name = f"{self.model.key} ({self.model.source_uri})"
        if self.gone:
            return f"{name}: removed from the cache while it was checked"
        if self.corrupt:
            where = ", ".join(f"{p} bytes {s}-{e}" for p, s, e in self.corrupt[:5])
            more = f" and {len(self.corrupt) - 5} more chunks" if len(self.corrupt) > 5 else ""
            return f"{name}: corrupt: {where}{more}"
        if self.unchecked:
            shown = ", ".join(self.unchecked[:5])
            return f"{name}: no local digest or sha256 recorded for {shown}"
        return f"{name}: ok ({len(self.model.files)} files, {self.bytes_hashed} bytes)"


def find_models(root: Path, names: Iterable[str] = ()) -> tuple[list[StoredModel], list[str]]:
    """The intact models under ``root`` (the cache dir), all or those ``names`` name (a
    key, its readable part, or the source URI); and the names that matched none."""
    models = [m for entry in listdir(root / "models") if (m := load_model(entry)) is not None]
    wanted = list(names)
    if not wanted:
        return models, []
    chosen, unknown = [], []
    for name in wanted:
        hits = [m for m in models if name in (m.key, m.source_uri, m.key.rpartition("-")[0])]
        if not hits:
            unknown.append(name)
        chosen.extend(m for m in hits if m not in chosen)
    return chosen, unknown


def verify_model(model: StoredModel, pool: ThreadPoolExecutor) -> Verdict:
    """Re-hash every chunk of ``model`` on ``pool``'s threads and compare."""
    jobs = []
    unchecked = []
    for f in model.files:
        if f.local is None:
            # A manifest written before local digests: its sha256, where it recorded one,
            # still tells a good file from a bad one (slower, one thread per file).
            if f.sha256 is None:
                unchecked.append(f.path)
            else:
                ok = pool.submit(_whole_file_ok, model.path, f)
                jobs.append((f, 0, f.size, ok))
            continue
        for (start, end), digest in zip(f.local.ranges(f.size), f.local.digests, strict=True):
            jobs.append((f, start, end, pool.submit(_chunk_ok, model.path, f, start, end, digest)))
    corrupt = tuple((f.path, start, end) for f, start, end, ok in jobs if not ok.result())
    if corrupt and not model.path.is_dir():
        return Verdict(model, gone=True)
    hashed = sum(end - start for _f, start, end, _ok in jobs)
    return Verdict(model, corrupt, tuple(unchecked), hashed)


def drop_corrupt(
    models: list[StoredModel], drop: Callable[[StoredModel], None], threads: int | None = None
) -> list[Verdict]:
    """Re-hash ``models`` and ``drop`` each corrupt one (the agent's start-up check, before
    anything is served); models without a local digest are kept, and said so."""
    verdicts = []
    with ThreadPoolExecutor(threads or default_threads(), "nodecache-verify") as pool:
        for model in models:
            verdict = verify_model(model, pool)
            verdicts.append(verdict)
            if verdict.corrupt:
                log.warning("removing %s, to fetch it again", verdict.describe())
                drop(model)
            elif verdict.unchecked:
                log.warning("kept unverified: %s", verdict.describe())
    return verdicts


def _chunk_ok(folder: Path, f: StoredFile, start: int, end: int, digest: str) -> bool:
    """Whether bytes ``[start, end)`` of ``f`` hash to ``digest``."""
    digest_now = new_hash()
    try:
        fd = os.open(folder / f.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != f.size:  # a mapping past the end would fault (SIGBUS)
            return False
        map_range(fd, start, end, digest_now.update)
    except OSError:
        return False
    finally:
        os.close(fd)
    return digest_now.hexdigest() == digest


def _whole_file_ok(folder: Path, f: StoredFile) -> bool:
    """Whether all of ``f`` hashes to its recorded sha256."""
    digest_now = hashlib.sha256()
    try:
        fd = os.open(folder / f.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != f.size:
            return False
        map_range(fd, 0, f.size, digest_now.update)
    except OSError:
        return False
    finally:
        os.close(fd)
    return digest_now.hexdigest() == f.sha256
