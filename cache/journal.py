"""The journal of a partial download: which parts of which files are complete and on disk.

Parts are recorded only after their bytes were flushed, so after a kill the next fetch
re-lists the source and reuses every recorded part of every file whose size and ETag are
unchanged; a file that changed at the source starts over.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from nodecache.cache.layout import JOURNAL_NAME
from nodecache.cache.perms import DEFAULT_FILE_MODE, create_file
from nodecache.cache.sources import RemoteFile

__all__ = ["Journal"]


class Journal:
    """Which parts of which files of a partial download are complete and on disk.

    Stored as JSON inside the partial folder; written by replace-and-rename so a kill never
    leaves it half written.
    """

    def __init__(
        self, folder: Path, source_uri: str, part_size: int, *, file_mode: int = DEFAULT_FILE_MODE
    ) -> None:
        self.path = folder / JOURNAL_NAME
        self.source_uri = source_uri
        self.part_size = part_size
        self.file_mode = file_mode
        self.files: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.save_lock = threading.Lock()

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if raw.get("source_uri") != self.source_uri or raw.get("part_size") != self.part_size:
            return
        files = raw.get("files")
        if isinstance(files, dict):
            self.files = files

    def resumable_parts(self, remote: RemoteFile) -> set[int]:
        entry = self.files.get(remote.path)
        if not entry or entry.get("size") != remote.size or entry.get("etag") != remote.etag:
            return set()
        return {int(i) for i in entry.get("parts", [])}

    def start(self, remote: RemoteFile, kept: set[int]) -> None:
        with self.lock:
            self.files[remote.path] = {
                "size": remote.size,
                "etag": remote.etag,
                "parts": sorted(kept),
            }

    def record(self, path: str, parts: list[int]) -> None:
        with self.lock:
            entry = self.files[path]
            entry["parts"] = sorted(set(entry["parts"]) | set(parts))

    def forget(self, path: str) -> None:
        with self.lock:
            self.files.pop(path, None)

    def save(self) -> None:
        with self.lock:
            data = json.dumps(
                {"source_uri": self.source_uri, "part_size": self.part_size, "files": self.files}
            )
        with self.save_lock:
            tmp = self.path.with_suffix(".tmp")
            fd = create_file(tmp, os.O_WRONLY | os.O_TRUNC, self.file_mode)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(data)
            os.replace(tmp, self.path)
