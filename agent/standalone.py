"""Standalone mode: one machine, declarations from a folder of YAML files."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from nodecache.agent.declarations import ModelDeclaration, refuse_duplicate_versions
from nodecache.agent.files import DeclarationFolder, FolderSnapshot
from nodecache.agent.node import NodeAgent
from nodecache.agent.services import SOCKET_NAME, STATUS_PATH, NodeOptions, NodeServices
from nodecache.serve.loop import on_stop_signal

__all__ = ["SOCKET_NAME", "STATUS_PATH", "run_standalone"]

log = logging.getLogger(__name__)


async def run_standalone(
    declarations: Path, options: NodeOptions, *, stop: asyncio.Event | None = None
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then shut down cleanly."""
    if not declarations.is_dir():
        raise SystemExit(f"declarations folder {declarations} does not exist")
    stop = stop or asyncio.Event()
    on_stop_signal(stop)
    node = await NodeServices.create(options)
    await node.start(mode="standalone", declarations=str(declarations))
    follower = asyncio.create_task(_follow(DeclarationFolder(declarations), node.agent))
    try:
        await stop.wait()
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await node.stop()


async def _follow(folder: DeclarationFolder, agent: NodeAgent) -> None:
    """Apply every snapshot of the folder. Whatever fails is logged and the watch starts
    again: an agent that silently stops following its declarations looks healthy."""
    first = True
    while True:
        try:
            async for snapshot in folder.watch():
                declarations, errors = _one_per_version(snapshot)
                await agent.apply(declarations, origins=snapshot.origins, errors=errors)
                if first and not snapshot.errors:
                    # Only when every file parsed: a typo must not cost a re-download.
                    await agent.collect_garbage()
                first = False
        except Exception:
            log.exception("following the declarations failed; starting again in 1 s")
            await asyncio.sleep(1.0)


def _one_per_version(
    snapshot: FolderSnapshot,
) -> tuple[dict[str, ModelDeclaration], dict[str, str]]:
    """The snapshot's declarations less those repeating a served name and version, each
    refusal reported against its file like any other invalid declaration."""
    declarations, refused = refuse_duplicate_versions(snapshot.declarations)
    errors = dict(snapshot.errors)
    for key, reason in refused.items():
        errors[snapshot.origins[key]] = f"model '{key}': {reason}"
    return declarations, errors
