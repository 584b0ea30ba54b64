"""Declaration files written to hurt: alias bombs, huge files, thousands of files, and a
folder replaced under the agent. Parsing stays bounded, off the event loop, and only for
files that changed; the folder is followed by its path."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Agent, declaration, uds_request, wait_for

import nodecache.agent.files as files_module
from nodecache.agent.declarations import DeclarationError, parse_declarations
from nodecache.agent.files import MAX_ERROR_CHARS, DeclarationFolder, FolderSnapshot


def alias_bomb(levels: int = 7) -> str:
    """A few hundred bytes that expand to 9**levels strings wherever the value is quoted."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return (
        "apiVersion: nodecache.io/v1alpha1\nkind: LocalModelCache\n"
        "metadata: {name: bomb}\nbombs:\n" + "".join(f"  {line}\n" for line in lines)
        + f"spec: {{sourceModelUri: *l{levels - 1}, modelSize: 1Mi, nodeGroups: [a]}}\n"
    )  # fmt: skip


def write_old(path: Path, content: str | bytes, age: float = 60.0) -> None:
    """Write ``path`` with an mtime in the past: a recent mtime is never trusted to mean
    unchanged (timestamps are coarse), so the agent would parse it again."""
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def test_an_alias_bomb_is_refused_without_expanding_it() -> None:
    assert len(alias_bomb()) < 1000
    with pytest.raises(DeclarationError, match="expands to more than") as refused:
        parse_declarations(alias_bomb(levels=12))  # 9**12 values if expanded
    assert len(str(refused.value)) < 200


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [*a]\n",  # refers to itself
        "[" * 5000 + "]" * 5000,
        "apiVersion: nodecache.io/v1alpha1\nkind: LocalModelCache\nmetadata: [1]\n",
        "apiVersion: nodecache.io/v1alpha1\nkind: " + "k" * 100_000 + "\n",
        "!!python/object/apply:os.system ['true']\n",
    ],
    ids=["self-reference", "deep", "metadata-list", "long-value", "python-tag"],
)
def test_hostile_yaml_is_a_short_declaration_error(text: str) -> None:
    with pytest.raises(DeclarationError) as refused:
        parse_declarations(text)
    assert len(str(refused.value)) < 400


@pytest.mark.parametrize(
    ("size", "message"),
    [("1e999999999Gi", "not a Kubernetes quantity"), ("'NaN'", "not a Kubernetes quantity"),
     ("'1E1000000'", "at most 8Ei"), ("0.5", "must be positive")],
)  # fmt: skip
def test_model_sizes_that_broke_the_parser(size: str, message: str) -> None:
    text = (
        "apiVersion: nodecache.io/v1alpha1\nkind: LocalModelCache\nmetadata: {name: a}\n"
        f"spec: {{sourceModelUri: 'gs://bucket/m', nodeGroups: [x], modelSize: {size}}}\n"
    )
    with pytest.raises(DeclarationError, match=message):
        parse_declarations(text)


def test_errors_name_the_file_and_quote_little(tmp_path: Path) -> None:
    write_old(tmp_path / "bomb.yaml", alias_bomb())
    write_old(tmp_path / "long.yaml", "kind: " + "x" * 50_000 + "\n")
    write_old(tmp_path / "huge.yaml", "# " + "x" * (2 << 20) + "\n")
    write_old(tmp_path / "bytes.yaml", b"kind: \xff\n")
    snapshot = DeclarationFolder(tmp_path).read()
    assert set(snapshot.errors) == {"bomb.yaml", "long.yaml", "huge.yaml", "bytes.yaml"}
    assert "expands to more than" in snapshot.errors["bomb.yaml"]
    assert "byte limit" in snapshot.errors["huge.yaml"]
    for error in snapshot.errors.values():
        assert len(error) <= MAX_ERROR_CHARS


def test_unchanged_files_are_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parses: list[str] = []

    def counting(text: str) -> object:
        parses.append(text)
        return parse_declarations(text)

    monkeypatch.setattr(files_module, "parse_declarations", counting)
    for i in range(20):
        write_old(tmp_path / f"m{i}.yaml", declaration(f"m{i}", "gs://bucket/m"))
    folder = DeclarationFolder(tmp_path)
    assert len(folder.read().declarations) == 20
    assert len(folder.read().declarations) == 20
    assert len(parses) == 20  # the second read only listed the folder

    write_old(tmp_path / "m3.yaml", declaration("m3", "gs://bucket/other"), age=30)
    assert folder.read().declarations["m3"].source_uri == "gs://bucket/other"
    assert len(parses) == 21


def test_a_same_size_rewrite_within_the_timestamp_granularity_is_seen(tmp_path: Path) -> None:
    """Same size, same inode, same mtime: only a recent mtime tells that it may have changed."""
    path = tmp_path / "m.yaml"
    path.write_text(declaration("m", "gs://bucket/aaaa"))
    stamp = path.stat().st_mtime_ns
    folder = DeclarationFolder(tmp_path)
    assert folder.read().declarations["m"].source_uri == "gs://bucket/aaaa"
    with path.open("r+") as f:  # in place: the inode stays
        f.write(declaration("m", "gs://bucket/bbbb"))
    os.utime(path, ns=(stamp, stamp))
    assert folder.read().declarations["m"].source_uri == "gs://bucket/bbbb"


async def test_files_are_parsed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[int] = set()

    def recording(text: str) -> object:
        threads.add(threading.get_ident())
        return parse_declarations(text)

    monkeypatch.setattr(files_module, "parse_declarations", recording)
    (tmp_path / "m.yaml").write_text(declaration("m", "gs://bucket/m"))
    snapshots = DeclarationFolder(tmp_path).watch(rescan=0.1)
    try:
        first = await asyncio.wait_for(anext(snapshots), 10)
    finally:
        await snapshots.aclose()
    assert list(first.declarations) == ["m"]
    assert threads and threading.get_ident() not in threads


class Follower:
    """Takes every snapshot of ``watch`` as the agent does, without waiting for the test."""

    def __init__(self, folder: DeclarationFolder, rescan: float) -> None:
        self.snapshots: asyncio.Queue[FolderSnapshot] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(folder, rescan))

    async def _run(self, folder: DeclarationFolder, rescan: float) -> None:
        async for snapshot in folder.watch(rescan):
            self.snapshots.put_nowait(snapshot)

    async def next(self, check: Callable[[FolderSnapshot], bool], what: str) -> FolderSnapshot:
        async def find() -> FolderSnapshot:
            while not check(snapshot := await self.snapshots.get()):
                pass
            return snapshot

        try:
            return await asyncio.wait_for(find(), 15)
        except TimeoutError:
            pytest.fail(f"no snapshot with {what}")

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_a_removed_folder_keeps_the_models_until_a_new_one_appears(tmp_path: Path) -> None:
    folder_path = tmp_path / "declarations"
    folder_path.mkdir()
    (folder_path / "a.yaml").write_text(declaration("a", "gs://bucket/a"))
    follower = Follower(DeclarationFolder(folder_path), rescan=0.1)
    try:
        first = await follower.next(lambda s: True, "the first snapshot")
        assert list(first.declarations) == ["a"]

        shutil.rmtree(folder_path)
        missing = await follower.next(
            lambda s: str(folder_path) in s.errors, "the folder reported missing"
        )
        assert list(missing.declarations) == ["a"]  # a blip deletes nothing

        fresh = tmp_path / "fresh"
        fresh.mkdir()
        (fresh / "b.yaml").write_text(declaration("b", "gs://bucket/b"))
        fresh.rename(folder_path)
        back = await follower.next(lambda s: "b" in s.declarations, "the new folder")
        assert list(back.declarations) == ["b"] and not back.errors  # its files are the truth
    finally:
        await follower.stop()


async def test_a_folder_moved_away_and_replaced_is_watched_anew(tmp_path: Path) -> None:
    """After ``mv``, the inotify watch would stay on the old folder: edits in the new one
    arrive by events, long before the (here one-minute) rescan."""
    folder_path = tmp_path / "declarations"
    folder_path.mkdir()
    (folder_path / "a.yaml").write_text(declaration("a", "gs://bucket/a"))
    follower = Follower(DeclarationFolder(folder_path), rescan=60)
    try:
        await follower.next(lambda s: True, "the first snapshot")
        await asyncio.sleep(0.5)  # the watch is up
        folder_path.rename(tmp_path / "old")
        folder_path.mkdir()
        await follower.next(lambda s: not s.declarations, "the new, empty folder")
        await asyncio.sleep(0.5)  # the watch on the new folder is up
        (folder_path / "b.yaml").write_text(declaration("b", "gs://bucket/b"))
        seen = await follower.next(lambda s: "b" in s.declarations, "b.yaml")
        assert list(seen.declarations) == ["b"]
    finally:
        await follower.stop()


def test_the_agent_reports_an_alias_bomb_in_a_small_status(agent: Agent, mlp_dir: Path) -> None:
    agent.start()
    agent.declare("good.yaml", declaration("good", mlp_dir.as_uri()))
    agent.declare("bomb.yaml", alias_bomb())

    def reported() -> dict[str, str] | None:
        errors = {e["file"]: e["error"] for e in agent.status()["declarationErrors"]}
        return errors or None

    errors = wait_for(reported, what="the bomb reported")
    assert "expands to more than" in errors["bomb.yaml"]
    code, _, body = uds_request(agent.socket, "GET", "/nodecache/v1/status")
    assert code == 200 and len(body) < 4096
    assert agent.log.stat().st_size < 64 * 1024
    agent.wait_state("good", "Warm")


def test_the_agent_follows_a_replaced_folder(agent: Agent, tmp_path: Path, mlp_dir: Path) -> None:
    agent.start()
    agent.declare("a.yaml", declaration("a", mlp_dir.as_uri()))
    agent.wait_state("a", "Warm")
    shutil.rmtree(agent.declarations)

    def missing_reported() -> bool:
        errors = [e["error"] for e in agent.status()["declarationErrors"]]
        return any("folder is missing" in e for e in errors)

    wait_for(missing_reported, what="the missing folder reported")
    assert agent.model("a")["state"] == "Warm"  # type: ignore[index]

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "b.yaml").write_text(declaration("b", mlp_dir.as_uri()))
    fresh.rename(agent.declarations)
    agent.wait_state("b", "Warm")
    wait_for(lambda: agent.model("a") is None, what="a gone with the old folder")
    assert json.dumps(agent.status()["declarationErrors"]) == "[]"
