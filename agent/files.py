"""Declarations from a folder of YAML files (standalone mode), watched with watchfiles.

Each call to ``read`` is level-triggered: it reads the whole folder and returns
what should exist now. A file that turns invalid keeps its last good declarations
(a typo must not delete a model from the node) and is reported.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from agent.declarations import DeclarationError, ModelDeclaration, parse_declarations

__all__ = ["DeclarationFolder", "FolderSnapshot"]

log = logging.getLogger(__name__)
SUFFIXES = (".yaml", ".yml")


@dataclass
class FolderSnapshot:
    declarations: dict[str, ModelDeclaration] = field(default_factory=dict)
    # model name -> file it came from
    origins: dict[str, str] = field(default_factory=dict)
    # file name -> why it was refused
    errors: dict[str, str] = field(default_factory=dict)


class DeclarationFolder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_good: dict[str, list[ModelDeclaration]] = {}
        self._reported: dict[str, str] = {}
        self._owners: dict[str, str] = {}  # model name -> file that declared it last time

    def read(self) -> FolderSnapshot:
        """Parse every declaration file; never raises for a bad file."""
        snapshot = FolderSnapshot()
        files = sorted(p for p in self.path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        present = {p.name for p in files}
        for gone in set(self._last_good) - present:
            del self._last_good[gone]
        parsed: dict[str, list[ModelDeclaration]] = {}
        for path in files:
            try:
                parsed[path.name] = parse_declarations(path.read_text())
            except (DeclarationError, OSError, UnicodeDecodeError) as exc:
                snapshot.errors[path.name] = str(exc)
                parsed[path.name] = self._last_good.get(path.name, [])
            else:
                self._last_good[path.name] = parsed[path.name]
        # A name declared twice stays with the file that had it before; a new file
        # cannot take a model away from a running one. Otherwise file order decides.
        order = sorted(parsed, key=lambda f: (f not in self._owners.values(), f))
        for filename in order:
            for decl in parsed[filename]:
                first = snapshot.origins.get(decl.name)
                if first is not None:
                    snapshot.errors[filename] = (
                        f"model '{decl.name}' is already declared in {first}"
                    )
                    continue
                snapshot.declarations[decl.name] = decl
                snapshot.origins[decl.name] = filename
        self._owners = dict(snapshot.origins)
        self._log_changes(snapshot.errors)
        return snapshot

    def _log_changes(self, errors: dict[str, str]) -> None:
        for name, reason in errors.items():
            if self._reported.get(name) != reason:
                log.error("invalid declaration file", extra={"file": name, "error": reason})
        for name in set(self._reported) - set(errors):
            log.info("declaration file valid again", extra={"file": name})
        self._reported = dict(errors)

    async def watch(self, rescan: float = 1.0) -> AsyncIterator[FolderSnapshot]:
        """The current snapshot, then a new one after every change to the folder.

        The folder is also read again every ``rescan`` seconds without events, and a
        snapshot yielded if it differs: a file written between the first read and the
        watcher's start (no event for it, ever) or a change inotify does not report (some
        network filesystems) is picked up within that time.
        """
        last = self.read()
        yield last
        async for changes in watchfiles.awatch(
            self.path,
            debounce=200,
            step=50,
            recursive=False,
            rust_timeout=int(rescan * 1000),
            yield_on_timeout=True,
        ):
            snapshot = self.read()
            if changes or snapshot != last:
                last = snapshot
                yield snapshot
