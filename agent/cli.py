"""The ``nodecache`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from nodecache.agent import prefetch
from nodecache.agent.argtypes import port, positive_int, quantity
from nodecache.agent.services import SOCKET_NAME, STATUS_PATH, NodeOptions
from nodecache.agent.standalone import run_standalone
from nodecache.cache import CacheDirInUseError, CacheDirLock
from nodecache.serve.logs import setup_logging
from nodecache.serve.loop import serve_forever
from nodecache.serve.protocol import DEFAULT_MAX_OUTPUT_BYTES
from nodecache.serve.transport import TransportLimits

__all__ = ["main"]

STANDALONE_HOME = Path(".nodecache")


def _group(text: str) -> int:
    import grp

    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and less than a day, got {text}")
    return value


def _default_socket_dir() -> Path:
    return Path(os.environ.get("NODECACHE_SOCKET_DIR", STANDALONE_HOME / "run"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodecache",
        description="Keep ML models on local disk and warm in memory; serve them over the "
        "Open Inference Protocol v2 on a node-local Unix socket.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = commands.add_parser(
        "agent",
        help="run the node agent",
        description="Run the node agent. With --declarations it runs standalone from a folder "
        "of LocalModelCache YAML files, watched for changes.",
    )
    agent.add_argument(
        "--declarations",
        type=Path,
        metavar="DIR",
        help="folder of LocalModelCache YAML files (standalone mode); files are watched",
    )
    agent.add_argument(
        "--cache-dir",
        type=Path,
        default=STANDALONE_HOME / "cache",
        metavar="DIR",
        help="where model files are kept on disk (default: %(default)s)",
    )
    agent.add_argument(
        "--cache-size",
        type=quantity,
        metavar="QUANTITY",
        help="most the cache may hold on disk, e.g. 500Gi; least-recently-used undeclared "
        "models are evicted to make room (default: what the disk has)",
    )
    prefetch.add_cache_mode(agent)
    agent.add_argument(
        "--socket-dir",
        type=Path,
        default=_default_socket_dir(),
        metavar="DIR",
        help=f"folder of the node socket {SOCKET_NAME} (default: %(default)s, "
        "or $NODECACHE_SOCKET_DIR)",
    )
    agent.add_argument(
        "--http-port",
        type=port,
        metavar="PORT",
        help="also serve the same API on this TCP port (off by default; 0 picks a free port)",
    )
    agent.add_argument(
        "--grpc-port",
        type=port,
        metavar="PORT",
        help="also serve OIP gRPC on this TCP port (always on <socket-dir>/nodecache-grpc.sock)",
    )
    agent.add_argument(
        "--http-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address for --http-port and --grpc-port (default: %(default)s)",
    )
    agent.add_argument(
        "--metrics-port",
        type=port,
        default=9464,
        metavar="PORT",
        help="Prometheus /metrics on this TCP port; 0 turns it off (default: %(default)s)",
    )
    agent.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address for --metrics-port (default: %(default)s)",
    )
    agent.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight requests may take to finish (default: %(default)s)",
    )
    agent.add_argument(
        "--header-timeout",
        type=_seconds,
        default=TransportLimits.header_timeout,
        metavar="SECONDS",
        help="a request head must arrive in full within this, else 408 and the connection "
        "closes (default: %(default)s)",
    )
    agent.add_argument(
        "--body-timeout",
        type=_seconds,
        default=TransportLimits.body_timeout,
        metavar="SECONDS",
        help="a request body must arrive in full within this after its head, else 408 "
        "(default: %(default)s)",
    )
    agent.add_argument(
        "--keepalive-timeout",
        type=_seconds,
        default=TransportLimits.keepalive_timeout,
        metavar="SECONDS",
        help="idle keep-alive connections are closed after this (default: %(default)s)",
    )
    agent.add_argument(
        "--cpu-memory-budget",
        type=quantity,
        metavar="QUANTITY",
        help="memory warm models may take on the CPU, as a Kubernetes quantity such as 2Gi "
        "(default: half of the machine's or container's memory)",
    )
    agent.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run N model-server worker processes, supervised, spread over the GPUs "
        "(default: one per GPU; on CPU-only nodes models are served in the agent process)",
    )
    agent.add_argument(
        "--socket-group",
        type=_group,
        metavar="GROUP",
        help="group (name or id) that owns the sockets; they are mode 0660 (default: the "
        "agent's group)",
    )
    agent.add_argument(
        "--model-concurrency",
        type=positive_int,
        default=4,
        metavar="N",
        help="runtime calls one model may run at once (default: %(default)s)",
    )
    agent.add_argument(
        "--model-queue",
        type=positive_int,
        default=256,
        metavar="N",
        help="requests one model may hold, running or waiting; more get 503 with "
        "Retry-After (default: %(default)s)",
    )
    agent.add_argument(
        "--spread-at",
        type=lambda text: positive_int(text, minimum=0),
        metavar="N",
        help="with several workers, give a hot model an extra warm copy on another worker "
        "with room once each copy has N requests in flight; copies on one GPU share its "
        "weights (default: the model concurrency; 0: never)",
    )
    agent.add_argument(
        "--max-output-bytes",
        type=quantity,
        default=DEFAULT_MAX_OUTPUT_BYTES,
        metavar="QUANTITY",
        help="most bytes of output tensors one inference answer may carry, e.g. 256Mi; "
        "larger answers are refused with 400 (default: 64Mi)",
    )
    _logging_options(agent)

    agent.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME", ""),
        metavar="NAME",
        help="cluster mode (no --declarations): this node's name (default: $NODE_NAME)",
    )
    agent.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="FILE",
        help="cluster mode: kubeconfig (default: in-cluster, $KUBECONFIG, ~/.kube/config)",
    )

    reconciler = commands.add_parser(
        "reconciler",
        help="run the cluster reconciler (placement, cache and group status)",
        description="Place models on nodes from LocalModelCaches, LocalModelNodeGroups and the "
        "agents' reports. Run two or more; one leads through a coordination.k8s.io Lease.",
    )
    reconciler.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="FILE",
        help="default: in-cluster, else $KUBECONFIG, else ~/.kube/config",
    )
    reconciler.add_argument(
        "--lease-name",
        default="nodecache-reconciler",
        metavar="NAME",
        help="(default: %(default)s)",
    )
    reconciler.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "nodecache-system"),
        metavar="NAMESPACE",
        help="(default: $POD_NAMESPACE, else %(default)s)",
    )
    reconciler.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME", ""),
        metavar="ID",
        help="this replica in the Lease (default: $POD_NAME, else hostname and a random suffix)",
    )
    reconciler.add_argument(
        "--metrics-port",
        type=port,
        default=9465,
        metavar="PORT",
        help="/metrics and /healthz on this TCP port; 0 turns it off (default: %(default)s)",
    )
    reconciler.add_argument(
        "--metrics-host", default="0.0.0.0", metavar="HOST", help="(default: %(default)s)"
    )
    _logging_options(reconciler)

    status = commands.add_parser(
        "status",
        help="show the models of a running agent",
        description="Ask the running agent over its socket for every declared model.",
    )
    status.add_argument(
        "--socket-dir",
        type=Path,
        default=_default_socket_dir(),
        metavar="DIR",
        help="folder of the agent's socket (default: %(default)s)",
    )
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    prefetch.add_parser(commands)
    return parser


def _logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="one line per event, as text or JSON (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="(default: %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prefetch":
        return prefetch.run(args)
    if args.command == "agent":
        return _agent(args)
    if args.command == "reconciler":
        return _reconciler(args)
    return _status(args)


def _agent(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    if args.declarations is None and not args.node_name:
        print(
            "nodecache agent: give --declarations DIR (standalone) or, in a cluster, "
            "--node-name NAME or $NODE_NAME",
            file=sys.stderr,
        )
        return 2
    try:  # one agent per cache dir: a second one would delete the first one's models
        claim = CacheDirLock(args.cache_dir, file_mode=args.cache_mode)
    except CacheDirInUseError as exc:
        print(f"nodecache: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"nodecache: cache dir {args.cache_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        return _run_agent(args)
    finally:
        claim.release()


def _run_agent(args: argparse.Namespace) -> int:
    options = NodeOptions(
        cache_dir=args.cache_dir,
        cache_mode=args.cache_mode,
        socket_dir=args.socket_dir,
        cache_size=args.cache_size,
        http_port=args.http_port,
        http_host=args.http_host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port or None,
        metrics_host=args.metrics_host,
        shutdown_timeout=args.shutdown_timeout,
        cpu_memory_budget=args.cpu_memory_budget,
        workers=args.workers,
        socket_group=args.socket_group,
        model_concurrency=args.model_concurrency,
        model_queue=args.model_queue,
        spread_at=args.spread_at,
        max_output_bytes=args.max_output_bytes,
        log_format=args.log_format,
        limits=TransportLimits(args.header_timeout, args.body_timeout, args.keepalive_timeout),
    )
    if args.declarations is None:
        from nodecache.agent.cluster import ClusterOptions, run_cluster

        serve_forever(
            run_cluster(ClusterOptions(args.node_name, options, kubeconfig=args.kubeconfig))
        )
        return 0
    serve_forever(run_standalone(args.declarations, options))
    return 0


def _reconciler(args: argparse.Namespace) -> int:
    from nodecache.agent.kube.reconciler import ReconcilerOptions, run_reconciler

    setup_logging(args.log_format, args.log_level)
    options = ReconcilerOptions(
        kubeconfig=args.kubeconfig,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        identity=args.identity,
        metrics_port=args.metrics_port or None,
        metrics_host=args.metrics_host,
    )
    asyncio.run(run_reconciler(options))
    return 0


def _status(args: argparse.Namespace) -> int:
    from nodecache.serve.client import ClientError, NodeClient

    socket_path = args.socket_dir / SOCKET_NAME

    async def fetch() -> Any:
        async with NodeClient(socket_path, timeout=10) as client:
            return await client.get(STATUS_PATH)

    try:
        status = asyncio.run(fetch())
    except (OSError, ClientError) as exc:
        print(f"nodecache status: no agent answers on {socket_path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
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
