"""Every ``nodecache`` setting, stated once: each field carries its default, its flag and its
help (field metadata), so the command line is built from the same dataclasses the agent
runs with, and a flag, its default and the option it sets cannot drift apart.

A field's flag is its name with dashes (``cache_dir`` -> ``--cache-dir``). Settings objects
owned by the serving tier (:class:`ServeSettings`, :class:`TransportLimits`) are embedded
whole; the flags for their fields are listed here, their defaults are theirs.
"""

# ruff: noqa: RUF009  # option() and nested() return dataclasses.field(...), as field() does

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from nodecache.agent.argtypes import (
    address,
    file_mode,
    group,
    non_negative_int,
    port,
    positive_int,
    quantity,
    seconds,
)
from nodecache.cache.errors import InvalidSourceError
from nodecache.cache.ociref import Mirror, parse_mirror
from nodecache.cache.perms import DEFAULT_FILE_MODE
from nodecache.serve.settings import ServeSettings, TransportLimits

__all__ = [
    "COMMANDS",
    "SOCKET_NAME",
    "AgentSettings",
    "NodeOptions",
    "Option",
    "ProxySettings",
    "ReconcilerOptions",
    "ReconcilerSettings",
    "StatusSettings",
    "VerifySettings",
    "add_option",
    "add_options",
    "flags",
    "from_arguments",
]

S = TypeVar("S")
OPTION = "nodecache.option"
NESTED = "nodecache.nested"
STANDALONE_HOME = Path(".nodecache")
SOCKET_NAME = "nodecache.sock"
"""The node socket's file name in ``--socket-dir``."""


@dataclass(frozen=True)
class Option:
    """How one settings field appears on the command line."""

    help: str
    metavar: str | None = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    action: str | None = None
    env: str | None = None
    """The default is read from this environment variable, when set, as the parser is built."""
    to_setting: Callable[[Any], Any] | None = None
    """The parsed value as the setting holds it (``0`` turns a port off: None)."""


def option(default: Any, help: str, **how: Any) -> Any:
    """A settings field with a command-line flag."""
    return field(default=default, metadata={OPTION: Option(help, **how)})


def nested(cls: type, flags: Mapping[str, Option] | None = None) -> Any:
    """A field holding another settings object. For one of ours, its fields carry their
    flags; for another tier's, ``flags`` names those of its fields that have one, in the
    order ``--help`` lists them (the others keep their default)."""
    return field(default_factory=cls, metadata={NESTED: flags})


def _zero_is_off(value: int) -> int | None:
    return value or None


def _registry_mirror(text: str) -> Mirror:
    """``HOST=MIRROR``; a bad one is a usage error that says why."""
    try:
        return parse_mirror(text)
    except InvalidSourceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


SECONDS = {"metavar": "SECONDS", "type": seconds}
LOG_FORMAT = Option(
    "one line per event, as text or JSON (default: %(default)s)", choices=("text", "json")
)
LOG_LEVEL = Option("(default: %(default)s)", choices=("debug", "info", "warning", "error"))

SERVE_FLAGS = {
    "model_concurrency": Option(
        "runtime calls one model may run at once (default: %(default)s)",
        metavar="N", type=positive_int,
    ),
    "model_queue": Option(
        "requests one model may hold, running or waiting; more get 503 with Retry-After "
        "(default: %(default)s)",
        metavar="N", type=positive_int,
    ),
    "spread_at": Option(
        "with several workers, give a hot model an extra warm copy on another worker with "
        "room once each copy has N requests in flight; copies on one GPU share its weights "
        "(default: the model concurrency; 0: never)",
        metavar="N", type=non_negative_int,
    ),
    "max_output_bytes": Option(
        "most bytes of output tensors one inference answer may carry, e.g. 256Mi; larger "
        "answers are refused with 400 (default: 64Mi)",
        metavar="QUANTITY", type=quantity,
    ),
    "log_format": LOG_FORMAT,
}  # fmt: skip

LIMIT_FLAGS = {
    "header_timeout": Option(
        "a request head must arrive in full within this, else 408 and the connection closes "
        "(default: %(default)s)",
        **SECONDS,
    ),
    "body_timeout": Option(
        "a request body must arrive in full within this after its head, else 408 "
        "(default: %(default)s)",
        **SECONDS,
    ),
    "keepalive_timeout": Option(
        "idle keep-alive connections are closed after this (default: %(default)s)", **SECONDS
    ),
}


@dataclass(frozen=True)
class NodeOptions:
    """How this node keeps and serves models (the same in both modes)."""

    cache_dir: Path = option(
        STANDALONE_HOME / "cache",
        "where model files are kept on disk (default: %(default)s)",
        metavar="DIR", type=Path,
    )  # fmt: skip
    cache_size: int | None = option(
        None,
        "most the cache may hold on disk, e.g. 500Gi; least-recently-used undeclared models "
        "are evicted to make room (default: what the disk has)",
        metavar="QUANTITY", type=quantity,
    )  # fmt: skip
    cache_mode: int = option(
        DEFAULT_FILE_MODE,
        "octal mode of the cached files, whatever the umask or the source's modes; folders "
        "get x wherever r is set (0640 -> 0750). Whoever reads the models (pods mounting them "
        "through the CSI volume included) needs the owner or the group; 0644 lets every user "
        "read them. Give the agent and its prefetches the same mode (default: 0640)",
        metavar="MODE", type=file_mode,
    )  # fmt: skip
    socket_dir: Path = option(
        STANDALONE_HOME / "run",
        f"folder of the node socket {SOCKET_NAME} (default: %(default)s, "
        "or $NODECACHE_SOCKET_DIR)",
        metavar="DIR", type=Path, env="NODECACHE_SOCKET_DIR",
    )  # fmt: skip
    http_port: int | None = option(
        None,
        "also serve the same API on this TCP port (off by default; 0 picks a free port)",
        metavar="PORT", type=port,
    )  # fmt: skip
    grpc_port: int | None = option(
        None,
        "also serve OIP gRPC on this TCP port (always on <socket-dir>/nodecache-grpc.sock)",
        metavar="PORT", type=port,
    )  # fmt: skip
    http_host: str = option(
        "127.0.0.1",
        "address for --http-port and --grpc-port (default: %(default)s)",
        metavar="HOST",
    )  # fmt: skip
    metrics_port: int | None = option(
        9464,
        "Prometheus /metrics on this TCP port; 0 turns it off (default: %(default)s)",
        metavar="PORT", type=port, to_setting=_zero_is_off,
    )  # fmt: skip
    metrics_host: str = option(
        "0.0.0.0", "address for --metrics-port (default: %(default)s)", metavar="HOST"
    )
    shutdown_timeout: float = option(
        30.0,
        "on SIGTERM, how long in-flight requests may take to finish (default: %(default)s)",
        metavar="SECONDS", type=float,
    )  # fmt: skip
    limits: TransportLimits = nested(TransportLimits, LIMIT_FLAGS)
    cpu_memory_budget: int | None = option(
        None,
        "memory warm models may take on the CPU, as a Kubernetes quantity such as 2Gi "
        "(default: half of the machine's or container's memory)",
        metavar="QUANTITY", type=quantity,
    )  # fmt: skip
    workers: int | None = option(
        None,
        "run N model-server worker processes, supervised, spread over the GPUs (default: one "
        "per GPU; on CPU-only nodes models are served in the agent process)",
        metavar="N", type=int,
    )  # fmt: skip
    socket_group: int | None = option(
        None,
        "group (name or id) that owns the sockets; they are mode 0660 (default: the agent's "
        "group)",
        metavar="GROUP", type=group,
    )  # fmt: skip
    serve: ServeSettings = nested(ServeSettings, SERVE_FLAGS)
    """What every model server runs with, in-process or in each worker."""
    verify_on_start: str = option(
        "quick",
        "at start, check the cached models: quick compares each file's size with its "
        "manifest; full also re-hashes every byte against the local digest recorded when it "
        "was verified, and removes (then fetches again) any model whose bytes changed, "
        "before serving it (default: %(default)s)",
        choices=("quick", "full"),
    )
    registry_mirror: tuple[Mirror, ...] = option(
        (),
        "for oci:// models from registry HOST, try MIRROR first (a pull-through cache, "
        "Spegel, Dragonfly: host[:port], https unless on loopback or written http://), e.g. "
        "docker.io=127.0.0.1:30020; repeatable, mirrors tried in order, then HOST. Content "
        "is fetched by digest and verified, so a mirror cannot change a model; a tag is "
        "resolved at HOST, at a mirror only when HOST cannot be reached. HOST's credentials "
        "never go to a mirror: give it its own docker config entry",
        metavar="HOST=MIRROR", type=_registry_mirror, action="append", to_setting=tuple,
    )  # fmt: skip
    csi_endpoint: str | None = option(
        None,
        "serve the CSI node service (driver csi.nodecache.io: pods mount a model folder "
        "read-only, or the socket folder, through inline volumes) on this endpoint, e.g. "
        "unix:///var/lib/kubelet/plugins/csi.nodecache.io/csi.sock (default: off)",
        metavar="ENDPOINT",
    )  # fmt: skip


@dataclass(frozen=True)
class AgentSettings:
    """``nodecache agent``: standalone with ``declarations``, else a cluster node."""

    declarations: Path | None = option(
        None,
        "folder of LocalModelCache YAML files (standalone mode); files are watched",
        metavar="DIR", type=Path,
    )  # fmt: skip
    node: NodeOptions = nested(NodeOptions)
    log_level: str = field(default="info", metadata={OPTION: LOG_LEVEL})
    node_name: str = option(
        "",
        "cluster mode (no --declarations): this node's name (default: $NODE_NAME)",
        metavar="NAME", env="NODE_NAME",
    )  # fmt: skip
    kubeconfig: Path | None = option(
        None,
        "cluster mode: kubeconfig (default: in-cluster, $KUBECONFIG, ~/.kube/config)",
        metavar="FILE", type=Path,
    )  # fmt: skip
    namespace: str = option(
        "nodecache-system",
        "cluster mode: the agent's namespace, where a LocalModelCache's storage.secretRef "
        "Secrets are read (default: $POD_NAMESPACE, else %(default)s)",
        metavar="NAMESPACE", env="POD_NAMESPACE",
    )  # fmt: skip


@dataclass(frozen=True)
class ReconcilerOptions:
    """What the reconciler (:mod:`nodecache.agent.kube.reconciler`) runs with, stated here
    and nowhere else: ``--help`` reads these defaults without loading the kubernetes client."""

    kubeconfig: Path | None = option(
        None, "default: in-cluster, else $KUBECONFIG, else ~/.kube/config",
        metavar="FILE", type=Path,
    )  # fmt: skip
    lease_name: str = option("nodecache-reconciler", "(default: %(default)s)", metavar="NAME")
    lease_namespace: str = option(
        "nodecache-system", "(default: $POD_NAMESPACE, else %(default)s)",
        metavar="NAMESPACE", env="POD_NAMESPACE",
    )  # fmt: skip
    identity: str = option(
        "",
        "this replica in the Lease (default: $POD_NAME, else hostname and a random suffix)",
        metavar="ID", env="POD_NAME",
    )  # fmt: skip
    metrics_port: int | None = option(
        9465,
        "/metrics and /healthz on this TCP port; 0 turns it off (default: %(default)s)",
        metavar="PORT", type=port, to_setting=_zero_is_off,
    )  # fmt: skip
    metrics_host: str = option("0.0.0.0", "(default: %(default)s)", metavar="HOST")
    limits: TransportLimits = nested(TransportLimits, LIMIT_FLAGS)
    """Of the metrics port: it listens on every address by default."""
    resync_interval: float = 30.0
    """A pass runs at least this often, with or without changes."""
    agent_timeout: float = 120.0
    """An agent silent (no LocalModelNode heartbeat) this long: its copies count as Unknown."""
    min_pass_interval: float = 1.0
    """Passes start at most this often: at 5,000 nodes the agents' status writes alone
    would otherwise keep one pass running after another."""
    watch_timeout: float = 300.0
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    write_concurrency: int = 16
    """API writes in flight at once during a pass (placing 5,000 nodes at the first pass)."""
    event_namespace: str = "default"
    """Where events about cluster-scoped caches go (kubectl describe finds them there)."""


@dataclass(frozen=True)
class ReconcilerSettings:
    """``nodecache reconciler``: the reconciler's options (those with a flag) and its logs."""

    reconciler: ReconcilerOptions = nested(ReconcilerOptions)
    log_format: str = field(default="text", metadata={OPTION: LOG_FORMAT})
    log_level: str = field(default="info", metadata={OPTION: LOG_LEVEL})


@dataclass(frozen=True)
class StatusSettings:
    """``nodecache status``: which agent to ask, and how to print its answer."""

    socket_dir: Path = option(
        STANDALONE_HOME / "run", "folder of the agent's socket (default: %(default)s)",
        metavar="DIR", type=Path, env="NODECACHE_SOCKET_DIR",
    )  # fmt: skip
    json: bool = option(False, "print the raw status as JSON", action="store_true")


@dataclass(frozen=True)
class VerifySettings:
    """``nodecache verify``: which cache folder to re-check (the models are arguments)."""

    cache_dir: Path = option(
        STANDALONE_HOME / "cache",
        "the cache folder, the same as the agent's --cache-dir (default: %(default)s)",
        metavar="DIR", type=Path,
    )  # fmt: skip


@dataclass(frozen=True)
class ProxySettings:
    """``nodecache proxy``: one model of the node socket on TCP, for a KServe runtime."""

    model: str = option(
        "", "the model's name on the node (its cache's served name); required", metavar="NAME"
    )
    served_name: str = option(
        "",
        "the name clients call the model by, e.g. the InferenceService's ({{.Name}} in a "
        "ServingRuntime): requests for it go to NAME and answers name it again; other names "
        "get 404 (default: NAME)",
        metavar="NAME",
    )  # fmt: skip
    listen: tuple[str, int] = option(
        ("", 8080),
        "OIP REST (V2 and KServe V1) on this address; no HOST: every address "
        "(default: :8080)",
        metavar="[HOST]:PORT", type=address,
    )  # fmt: skip
    grpc_listen: tuple[str, int] | None = option(
        None, "OIP gRPC on this address (default: off)", metavar="[HOST]:PORT", type=address
    )
    socket_dir: Path = option(
        STANDALONE_HOME / "run",
        f"folder of the node socket {SOCKET_NAME}: where the pod mounts the CSI volume "
        "with socket: \"true\" (default: %(default)s, or $NODECACHE_SOCKET_DIR)",
        metavar="DIR", type=Path, env="NODECACHE_SOCKET_DIR",
    )  # fmt: skip
    max_body: int = option(
        64 * 1024 * 1024,
        "largest request body (and gRPC message) accepted; larger ones get 413 "
        "(default: 64Mi)",
        metavar="QUANTITY", type=quantity,
    )  # fmt: skip
    node_connections: int = option(
        256,
        "most connections to the node socket at once; a request beyond them gets 503 with "
        "Retry-After (default: %(default)s)",
        metavar="N", type=positive_int,
    )  # fmt: skip
    limits: TransportLimits = nested(TransportLimits, LIMIT_FLAGS)
    log_format: str = field(default="text", metadata={OPTION: LOG_FORMAT})
    log_level: str = field(default="info", metadata={OPTION: LOG_LEVEL})


COMMANDS: dict[str, type] = {
    "agent": AgentSettings,
    "reconciler": ReconcilerSettings,
    "status": StatusSettings,
    "proxy": ProxySettings,
    "verify": VerifySettings,
}
"""The commands whose settings live here (``prefetch`` is built in agent/prefetch.py)."""


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """A flag for every field of ``cls`` that has one, nested settings included."""
    for name, default, how in _options(cls):
        _add(parser, name, default, how)


def add_option(parser: argparse.ArgumentParser, cls: type, name: str) -> None:
    """The one flag of ``cls`` for field ``name`` (a flag two commands share)."""
    (item,) = (o for o in _options(cls) if o[0] == name)
    _add(parser, *item)


def flags(cls: type) -> list[str]:
    """The flags ``add_options(parser, cls)`` adds, in order."""
    return [_flag(name) for name, _, _ in _options(cls)]


def from_arguments(cls: type[S], args: argparse.Namespace) -> S:
    """The settings a parser built by :func:`add_options` read from the command line."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if OPTION in f.metadata:
            value = getattr(args, f.name)
            convert = f.metadata[OPTION].to_setting
            values[f.name] = convert(value) if convert else value
        elif NESTED in f.metadata:
            flags_of = f.metadata[NESTED]
            if flags_of is None:
                values[f.name] = from_arguments(f.default_factory, args)
            else:
                inner = f.default_factory()
                values[f.name] = replace(inner, **{n: getattr(args, n) for n in flags_of})
    return cls(**values)


def _options(cls: type) -> Iterator[tuple[str, Any, Option]]:
    """Each flag of ``cls`` as (field name, default, how), nested settings' in place."""
    for f in fields(cls):
        if OPTION in f.metadata:
            yield f.name, f.default, f.metadata[OPTION]
        elif NESTED in f.metadata:
            flags_of = f.metadata[NESTED]
            if flags_of is None:  # settings of ours: their own fields say
                yield from _options(f.default_factory)
            else:
                inner = f.default_factory()
                yield from ((name, getattr(inner, name), how) for name, how in flags_of.items())


def _add(parser: argparse.ArgumentParser, name: str, default: Any, how: Option) -> None:
    if how.env is not None and how.env in os.environ:
        text = os.environ[how.env]
        default = Path(text) if isinstance(default, Path) else text
    extra = {
        key: value
        for key, value in (("metavar", how.metavar), ("type", how.type),
                           ("choices", how.choices), ("action", how.action))
        if value is not None
    }  # fmt: skip
    if how.action == "append":  # argparse appends to the default it is given
        default = list(default)
    parser.add_argument(_flag(name), default=default, help=how.help, **extra)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
