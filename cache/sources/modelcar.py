"""Image and archive layers unpacked into a model folder: KServe modelcars, tar ModelPacks.

A modelcar is an image built ``FROM`` some base with the model copied to ``/models``. The
OCI source takes a manifest for one when it is no ModelPack and none of its layers carries an
``org.opencontainers.image.title`` annotation (every ORAS layer does); then every layer must
have one of :data:`LAYER_TYPES` (zstd and other types are refused before any download). Its
layers (tar or tar+gzip) are fetched as blobs into a scratch folder of the partial download,
each verified against its sha256 digest by the fetcher, and only then unpacked here, in
order, as a container runtime would apply them: later layers overwrite earlier files, OCI
whiteouts (``.wh.NAME`` deletes NAME, ``.wh..wh..opq`` empties the folder of what earlier
layers put there) are honoured under ``models/``, and everything outside ``models/`` is
skipped. Each layer's blob is deleted once it is applied.

A CNCF ModelPack whose layers are tar archives (what ``modctl build`` writes unless told
``--raw``) goes through the same unpacker, each archive's paths relative to the model folder
(no ``models/`` to strip; below, read "the model folder" for ``/models``).

Refused, naming the entry, before anything is published: absolute names and ``..``
anywhere in a layer, device and fifo entries under ``models/``, and symbolic or hard links
whose target is not under ``/models``. A symbolic link that stays inside becomes a hard link
to its target file (the manifest lists regular files only); one to a folder or to nothing is
dropped and logged. Bytes written are taken from the download's budget, so a gzip bomb stops
at the model's allowance.

Reading a layer is bounded too, not only what it writes: extended tar headers and sparse
entries as :mod:`boundedtar` says, and every byte the tar streams of one model yield after
decompression, skipped entries outside ``/models`` included, is counted against
:func:`expansion_limit` (twice the write budget, plus :data:`BASE_ALLOWANCE` for the base
image), so no layer spends unbounded memory or CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from nodecache.cache.budget import WriteBudget
from nodecache.cache.errors import FetchError
from nodecache.cache.layout import JOURNAL_NAME, RESERVED_PREFIX, check_relative_path
from nodecache.cache.localdigest import LocalDigest, new_hash
from nodecache.cache.perms import create_file, folder_mode, make_folder
from nodecache.cache.quota import format_bytes
from nodecache.cache.sources.base import UnpackedFile
from nodecache.cache.sources.boundedtar import ARCHIVE_ERRORS, UnsafeArchive, open_tar

__all__ = [
    "BASE_ALLOWANCE",
    "LAYERS_DIR",
    "LAYER_TYPES",
    "MODELS",
    "Layer",
    "expansion_limit",
    "tar_mode",
    "unpack_layers",
]

log = logging.getLogger(__name__)

LAYERS_DIR = RESERVED_PREFIX + "layers"
"""Scratch folder of a partial download holding the fetched layer blobs."""
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "r|",
    "application/vnd.oci.image.layer.v1.tar+gzip": "r|gz",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "r|gz",
}
"""Image layer media types unpacked, and the tarfile stream mode that reads each."""
MODELPACK_LAYER = "application/vnd.cncf.model."
"""What every ModelPack layer media type starts with (``...weight.v1.tar``, ``.raw``...)."""
MODELS = "models"
"""The folder of the image that is the model (KServe mounts the modelcar's ``/models``)."""
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20
LOCAL_CHUNK = 32 << 20
"""Bytes per chunk of an unpacked file's local digest (the fetcher's default part size)."""
_MAX_LINK_HOPS = 40
BASE_ALLOWANCE = 1 << 30
"""Decompressed bytes a model's layers may hold beyond twice its write budget: the base
image's files outside ``/models`` (busybox is 4 MiB, a full Python image about 1 GiB)."""


def expansion_limit(budget: WriteBudget) -> int:
    """The most the tar streams of one model may yield after decompression: the model's
    files (the budget), as much again for what is overwritten, deleted or skipped, and the
    base image."""
    return 2 * budget.limit + BASE_ALLOWANCE


@dataclass(frozen=True)
class Layer:
    """One layer blob on disk, in the order the manifest applies it."""

    path: Path
    media_type: str
    digest: str

    @property
    def mode(self) -> str:
        mode = tar_mode(self.media_type)
        assert mode is not None, "only tar layers are listed for unpacking"
        return mode


def tar_mode(media_type: str) -> str | None:
    """The tarfile stream mode reading a layer of ``media_type``; None for anything but an
    uncompressed or gzip tar (a ModelPack ``.raw`` file, zstd, unknown types)."""
    if media_type in LAYER_TYPES:
        return LAYER_TYPES[media_type]
    if media_type.startswith(MODELPACK_LAYER):
        if media_type.endswith(".tar"):
            return "r|"
        if media_type.endswith(".tar+gzip"):
            return "r|gz"
    return None


class _LocalFold:
    """A file's local digest as its bytes are written: one xxh3-128 per
    :data:`LOCAL_CHUNK` (one for the whole file when it is no larger)."""

    def __init__(self) -> None:
        self.digests: list[str] = []
        self.current = new_hash()
        self.filled = 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), LOCAL_CHUNK - self.filled)
            self.current.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == LOCAL_CHUNK:
                self.digests.append(self.current.hexdigest())
                self.current, self.filled = new_hash(), 0

    def finish(self, size: int) -> LocalDigest:
        if self.filled or not self.digests:
            self.digests.append(self.current.hexdigest())
        return LocalDigest(LOCAL_CHUNK if size > LOCAL_CHUNK else 0, tuple(self.digests))


@dataclass
class _Tree:
    """The model folder as the layers applied so far left it."""

    root: Path
    uri: str
    file_mode: int
    budget: WriteBudget
    within: str
    """The archives' folder that is the model: ``models`` (a modelcar), or ``""`` (all)."""
    files: dict[str, UnpackedFile] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    """Symbolic links (path -> target path, both relative to ``models/``), made at the end."""
    written: set[str] = field(default_factory=set)
    """Paths the layer being applied wrote (an opaque marker keeps them)."""
    expanded: int = 0
    """Bytes the layers' tar streams yielded so far, after decompression."""

    def count(self, n: int) -> None:
        """``n`` more bytes read from a layer's tar stream, within :func:`expansion_limit`."""
        self.expanded += n
        if self.expanded > (most := expansion_limit(self.budget)):
            raise UnsafeArchive(
                f"expands the layers past {format_bytes(most)} (twice the model's write "
                f"allowance of {format_bytes(self.budget.limit)}, plus "
                f"{format_bytes(BASE_ALLOWANCE)} for the base image)"
            )

    def refuse(self, entry: str, layer: Layer, why: str) -> FetchError:
        return FetchError(
            f"{self.uri}: layer {layer.digest[:19]} entry {entry!r} {why}; nothing was published",
            permanent=True,
        )

    @property
    def inside(self) -> str:
        return f"under /{self.within}" if self.within else "in the model folder"

    @property
    def outside(self) -> str:
        return f"outside /{self.within}" if self.within else "outside the model folder"

    def stopped(self) -> FetchError:
        """The download was stopped (cancelled) while unpacking: not the image's fault."""
        return FetchError(f"{self.uri}: unpacking stopped")

    def forget(self, rel: str) -> None:
        """Drop what is recorded at ``rel`` and under it (files and links)."""
        prefix = rel + "/" if rel else ""
        for table in (self.files, self.links):
            for key in [k for k in table if k == rel or k.startswith(prefix)]:
                del table[key]

    def remove(self, rel: str) -> None:
        """Delete ``rel`` (file, folder or link) from disk and from the records."""
        path = self.root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        self.forget(rel)

    def opaque(self, rel: str) -> None:
        """Empty folder ``rel`` of everything earlier layers put in it."""
        folder = self.root / rel
        if folder.is_dir():
            for child in os.listdir(folder):
                child_rel = f"{rel}/{child}" if rel else child
                if not rel and child.startswith(RESERVED_PREFIX):
                    continue  # the journal and the layer blobs
                if child_rel not in self.written:
                    self.remove(child_rel)
                elif (folder / child).is_dir():
                    self.opaque(child_rel)
        prefix = rel + "/" if rel else ""
        for link in [k for k in self.links if k.startswith(prefix) and k not in self.written]:
            del self.links[link]

    def make_parents(self, rel: str) -> None:
        """Folders up to ``rel``'s parent, replacing files an earlier layer had there."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            path = self.root / sub
            self.written.add(sub)  # this layer has it: an opaque marker keeps it
            if not path.is_dir():
                if path.exists():
                    self.remove(sub)
                self.links.pop(sub, None)
                make_folder(path, folder_mode(self.file_mode))

    def clear_at(self, rel: str) -> None:
        """Make way for a new entry at ``rel``."""
        self.make_parents(rel)
        path = self.root / rel
        if path.exists():
            self.remove(rel)
        self.forget(rel)
        self.written.add(rel)

    def write(self, rel: str, data: IO[bytes], abort: threading.Event) -> None:
        self.clear_at(rel)
        digest, local, size = hashlib.sha256(), _LocalFold(), 0
        fd = create_file(self.root / rel, os.O_WRONLY | os.O_TRUNC, self.file_mode)
        with os.fdopen(fd, "wb") as out:
            while chunk := data.read(_CHUNK):
                if abort.is_set():
                    raise self.stopped()
                self.budget.take(len(chunk))
                digest.update(chunk)
                local.update(chunk)
                out.write(chunk)
                size += len(chunk)
        self.files[rel] = UnpackedFile(rel, size, digest.hexdigest(), local.finish(size))

    def hard_link(self, rel: str, target: str) -> None:
        """``rel`` as another name of file ``target`` (same bytes, so the same digest)."""
        self.clear_at(rel)
        os.link(self.root / target, self.root / rel)
        self.files[rel] = replace(self.files[target], path=rel)


def unpack_layers(
    folder: Path,
    layers: list[Layer],
    *,
    uri: str,
    file_mode: int,
    budget: WriteBudget,
    abort: threading.Event,
    within: str = MODELS,
) -> list[UnpackedFile]:
    """Apply ``layers`` (verified blobs) in order into ``folder``; the model's files, sorted.
    Only what the archives hold under ``within`` is kept (everything where it is ``""``).

    Blocking. Each blob is deleted once applied; whatever a killed earlier attempt left in
    ``folder`` (other than the journal and the blobs) is removed first.
    """
    for entry in os.listdir(folder):
        if entry not in (JOURNAL_NAME, LAYERS_DIR):
            _remove_path(folder / entry)
    tree = _Tree(folder, uri, file_mode, budget, within)
    for layer in layers:
        tree.written = set()
        _apply(tree, layer, abort)
        layer.path.unlink()
    shutil.rmtree(folder / LAYERS_DIR, ignore_errors=True)
    _make_links(tree)
    if not tree.files:
        raise FetchError(f"{uri}: the layers hold no files {tree.inside}", permanent=True)
    return sorted(tree.files.values(), key=lambda f: f.path)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _apply(tree: _Tree, layer: Layer, abort: threading.Event) -> None:
    """Apply one layer's tar stream to the tree."""
    gzipped = layer.mode == "r|gz"
    try:
        with open_tar(layer.path, gzipped=gzipped, count=tree.count, bufsize=_CHUNK) as tar:
            for member in _members(tar):
                if abort.is_set():
                    raise tree.stopped()
                _entry(tree, layer, tar, member, abort)
    except UnsafeArchive as exc:
        raise FetchError(
            f"{tree.uri}: layer {layer.digest[:19]} {exc.args[0]}; refused, nothing was published",
            permanent=True,
        ) from None
    except ARCHIVE_ERRORS as exc:  # disk errors go up as they are
        raise FetchError(
            f"{tree.uri}: layer {layer.digest[:19]} is not a valid {layer.media_type} "
            f"archive ({type(exc).__name__}: {str(exc)[:120]})",
            permanent=True,
        ) from None


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The entries of a streamed tar, none kept once read (a base layer may have 10^5)."""
    while (member := tar.next()) is not None:
        yield member
        tar.members.clear()


def _entry(
    tree: _Tree,
    layer: Layer,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    abort: threading.Event,
) -> None:
    """Apply one tar entry (skipped unless it is under ``tree.within``)."""
    name = member.name
    if name.startswith("/"):
        raise tree.refuse(name, layer, "is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise tree.refuse(name, layer, "climbs out with '..'")
    within = [tree.within] if tree.within else []
    if parts == [_OPAQUE] or (within and parts == [_WHITEOUT + tree.within]):
        tree.opaque("")  # a later layer deleted all of it
        return
    if not parts or parts[: len(within)] != within:
        return
    rel = "/".join(parts[len(within) :])
    base = parts[-1]
    if base == _OPAQUE:
        tree.opaque(posixpath.dirname(rel))
        return
    if base.startswith(_WHITEOUT):
        gone = posixpath.join(posixpath.dirname(rel), base[len(_WHITEOUT) :])
        check_relative_path(gone, tree.uri)
        tree.remove(gone)
        return
    if member.ischr() or member.isblk() or member.isfifo():
        raise tree.refuse(name, layer, "is a device or fifo")
    if not rel:
        return  # models/ itself
    check_relative_path(rel, tree.uri)
    if member.isdir():
        path = tree.root / rel
        if path.exists() and not path.is_dir():
            tree.remove(rel)
        tree.make_parents(rel)
        make_folder(path, folder_mode(tree.file_mode))
        tree.links.pop(rel, None)
        tree.written.add(rel)
    elif member.isreg():
        data = tar.extractfile(member)
        assert data is not None  # a regular member always has a stream
        tree.write(rel, data, abort)
    elif member.issym():
        target = _inside(posixpath.join("/", *parts[:-1]), member.linkname, tree.within)
        if target is None:
            raise tree.refuse(name, layer, f"is a link to {member.linkname!r}, {tree.outside}")
        tree.clear_at(rel)
        tree.links[rel] = target
    elif member.islnk():
        target = _inside("/", member.linkname, tree.within)
        if target is None:
            raise tree.refuse(name, layer, f"is a link to {member.linkname!r}, {tree.outside}")
        if target in tree.links:
            tree.clear_at(rel)
            tree.links[rel] = tree.links[target]
        elif target in tree.files:
            tree.hard_link(rel, target)
        else:
            raise tree.refuse(name, layer, f"is a hard link to {member.linkname!r}, not a file")
    else:
        raise tree.refuse(name, layer, f"has a tar entry type {member.type!r} we do not unpack")


def _inside(folder: str, target: str, within: str) -> str | None:
    """``target`` (relative to archive folder ``folder``, or absolute) as a path relative
    to ``/within``, or None where it is not strictly inside."""
    resolved = posixpath.normpath(posixpath.join(folder, target))
    resolved = "/" + resolved.lstrip("/")  # normpath keeps a leading '//'
    prefix = f"/{within}/" if within else "/"
    if not resolved.startswith(prefix) or resolved == prefix:
        return None
    return resolved[len(prefix) :]


def _make_links(tree: _Tree) -> None:
    """Each symbolic link to a file becomes a hard link to it; the others are dropped."""
    for rel, first in sorted(tree.links.items()):
        target = first
        for _ in range(_MAX_LINK_HOPS):
            if target not in tree.links:
                break
            target = tree.links[target]
        if target in tree.files and not (tree.root / rel).exists():
            tree.hard_link(rel, target)
            continue
        log.warning(
            "%s: dropped symbolic link %s (its target is no file %s)", tree.uri, rel, tree.inside
        )
