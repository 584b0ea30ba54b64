"""The ``nodecache`` command. Its flags come from the settings dataclasses
(:mod:`nodecache.agent.settings`); this module only arranges them into commands and runs one."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from nodecache.agent import prefetch
from nodecache.agent.settings import (
    SOCKET_NAME,
    AgentSettings,
    ProxySettings,
    ReconcilerSettings,
    StatusSettings,
    VerifySettings,
    add_options,
    from_arguments,
)
from nodecache.cache import CacheDirInUseError, CacheDirLock
from nodecache.serve.logs import setup_logging
from nodecache.serve.loop import serve_forever

__all__ = ["build_parser", "format_status", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodecache",
        description="Keep ML models on local disk and warm in memory; serve them over the "
        "Open Inference Protocol v2 on a node-local Unix socket.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    agent = commands.add_parser(
        "agent",
        help="run the node agent",
        description="Run the node agent. With --declarations it runs standalone from a folder "
        "of LocalModelCache YAML files, watched for changes.",
    )
    add_options(agent, AgentSettings)
    reconciler = commands.add_parser(
        "reconciler",
        help="run the cluster reconciler (placement, cache and group status)",
        description="Place models on nodes from LocalModelCaches, LocalModelNodeGroups and the "
        "agents' reports. Run two or more; one leads through a coordination.k8s.io Lease.",
    )
    add_options(reconciler, ReconcilerSettings)
    status = commands.add_parser(
        "status",
        help="show the models of a running agent",
        description="Ask the running agent over its socket for every declared model.",
    )
    add_options(status, StatusSettings)
    proxy = commands.add_parser(
        "proxy",
        help="forward one model of the node socket to a TCP port (KServe runtimes)",
        description="Forward Open Inference Protocol REST (V2, KServe V1) and gRPC from TCP "
        "ports to the node socket, renaming the model from the name clients use to the "
        "cache's. Runs in an inference pod that mounts the socket folder through a "
        'csi.nodecache.io volume with socket: "true".',
    )
    add_options(proxy, ProxySettings)
    verify = commands.add_parser(
        "verify",
        help="re-check cached models against the digests recorded when they were verified",
        description="Re-hash every file of the named cached models (all when none is named) "
        "against the local digest recorded when it was verified against its source, at "
        "memory bandwidth, and print one line per model. Read-only, safe while an agent "
        "runs. Exit status: 0 all ok, 1 a model is corrupt or has no local digest, 2 bad "
        "arguments or no such model.",
    )
    verify.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="a model's folder name under models/, its readable part, or its source URI",
    )
    add_options(verify, VerifySettings)
    prefetch.add_parser(commands)
    return parser


def _version() -> str:
    """The installed distribution's version: what an image or a bug report names."""
    try:
        return version("nodecache")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prefetch":
        return prefetch.run(args)
    if args.command == "agent":
        return _agent(args)
    if args.command == "reconciler":
        return _reconciler(args)
    if args.command == "proxy":
        return _proxy(args)
    if args.command == "verify":
        return _verify(args)
    return _status(args)


def _agent(args: argparse.Namespace) -> int:
    settings = from_arguments(AgentSettings, args)
    setup_logging(settings.node.serve.log_format, settings.log_level)
    if settings.declarations is None and not settings.node_name:
        print(
            "nodecache agent: give --declarations DIR (standalone) or, in a cluster, "
            "--node-name NAME or $NODE_NAME",
            file=sys.stderr,
        )
        return 2
    node = settings.node
    try:  # one agent per cache dir: a second one would delete the first one's models
        claim = CacheDirLock(node.cache_dir, file_mode=node.cache_mode)
    except CacheDirInUseError as exc:
        print(f"nodecache: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"nodecache: cache dir {node.cache_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        return _run_agent(settings)
    finally:
        claim.release()


def _run_agent(settings: AgentSettings) -> int:
    if settings.declarations is None:
        from nodecache.agent.cluster import ClusterOptions, run_cluster

        cluster = ClusterOptions(
            settings.node_name,
            settings.node,
            kubeconfig=settings.kubeconfig,
            namespace=settings.namespace,
        )
        serve_forever(run_cluster(cluster))
        return 0
    from nodecache.agent.standalone import run_standalone

    serve_forever(run_standalone(settings.declarations, settings.node))
    return 0


def _reconciler(args: argparse.Namespace) -> int:
    from nodecache.agent.kube.reconciler import run_reconciler

    settings = from_arguments(ReconcilerSettings, args)
    setup_logging(settings.log_format, settings.log_level)
    asyncio.run(run_reconciler(settings.reconciler))
    return 0


def _proxy(args: argparse.Namespace) -> int:
    from nodecache.agent.proxy import run_proxy

    settings = from_arguments(ProxySettings, args)
    if not settings.model:
        print("nodecache proxy: give --model NAME, the model's name on the node", file=sys.stderr)
        return 2
    setup_logging(settings.log_format, settings.log_level)
    try:
        serve_forever(run_proxy(settings))
    except OSError as exc:  # a port in use, an address not on this host
        print(f"nodecache proxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from nodecache.cache.verify import default_threads, find_models, verify_model

    settings = from_arguments(VerifySettings, args)
    if not (settings.cache_dir / "models").is_dir():
        print(f"nodecache verify: no cache at {settings.cache_dir}", file=sys.stderr)
        return 2
    models, unknown = find_models(settings.cache_dir, args.names)
    if unknown:
        print(f"nodecache verify: no such cached model: {', '.join(unknown)}", file=sys.stderr)
        return 2
    status = 0
    with ThreadPoolExecutor(default_threads(), "nodecache-verify") as pool:
        for model in models:
            verdict = verify_model(model, pool)
            print(verdict.describe(), flush=True)
            status = status if verdict.ok else 1
    return status


def _status(args: argparse.Namespace) -> int:
    from nodecache.agent.services import STATUS_PATH
    from nodecache.serve.client import ClientError, NodeClient

    settings = from_arguments(StatusSettings, args)
    socket_path = settings.socket_dir / SOCKET_NAME

    async def fetch() -> Any:
        async with NodeClient(socket_path, timeout=10) as client:
            return await client.get(STATUS_PATH)

    try:
        status = asyncio.run(fetch())
    except (OSError, ClientError) as exc:
        print(f"nodecache status: no agent answers on {socket_path}: {exc}", file=sys.stderr)
        return 1
    if settings.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    rows = [("NAME", "STATE", "SIZE", "PROGRESS", "DEVICE", "ERROR")]
    for m in status["models"]:
        total = m.get("bytesTotal")
        progress = f"{100 * m['bytes'] // total}%" if total else "-"
        error = m.get("error") or ""
        if error and m.get("nextRetry"):
            error += f" (retry in {max(0, m['nextRetry'] - time.time()):.0f}s)"
        rows.append(
            (
                m["name"],
                m["state"],
                _human(total or m["modelSize"]),
                progress,
                _placement(m),
                error,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[5]]) for r in rows
    ]
    for device in status.get("devices", []):
        where = f" (worker {device['worker']})" if "worker" in device else ""
        lines.append(
            f"device {device['name']}{where}: {_human(device['used'])} used of "
            f"{_human(device['budget'])} budget, {_human(device['free'])} free"
        )
    for problem in status.get("declarationErrors", []):
        lines.append(f"invalid declaration file {problem['file']}: {problem['error']}")
    return "\n".join(line.rstrip() for line in lines)


def _placement(model: dict[str, Any]) -> str:
    """The model's device, and its extra warm copies on other workers if it has any."""
    device = model.get("device") or "-"
    copies = model.get("copies") or []
    if copies:
        device += " +" + ",".join(c["device"] for c in copies)
    return device


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


if __name__ == "__main__":
    sys.exit(main())
