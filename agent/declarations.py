"""Cache declarations (``LocalModelCache`` objects) parsed and validated.

The same checks the CRD schema makes in a cluster, so a file that works standalone
also applies to a cluster, and a KServe manifest works after changing apiVersion.
"""

from __future__ import annotations

import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from nodecache.agent.quantity import parse_quantity
from nodecache.cache import InvalidSourceError, validate_source_uri
from nodecache.cache.layout import scoped
from nodecache.serve.runtimes import FORMATS

__all__ = [
    "API_VERSION",
    "MAX_VALUES",
    "DeclarationError",
    "ModelDeclaration",
    "Serving",
    "WarmPolicy",
    "parse_declarations",
    "parse_object",
    "refuse_duplicate_versions",
]

API_VERSION = "nodecache.io/v1alpha1"
KINDS = ("LocalModelCache",)
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS label
_DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# libyaml's safe loader where PyYAML was built with it: a 1 MiB file parses in well under a
# second instead of several.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Values one file may hold once its YAML aliases are expanded: a few hundred bytes of
# nested anchors expand to millions, and every consumer (error messages, status, logs)
# would expand them. A declaration has a few dozen values; a file of hundreds fits.
MAX_VALUES = 100_000
_MAX_DEPTH = 64
_MAX_SIZE = 2**63 - 1  # a Kubernetes quantity's int64 range
_MAX_QUEUE_DELAY = 10.0  # seconds a batch may wait for more requests
# Values quoted in error messages are shortened: a message must stay one readable line.
_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = 60
_QUOTE.maxlist = _QUOTE.maxdict = _QUOTE.maxtuple = 4
_QUOTE.maxlevel = 2
_quote = _QUOTE.repr


class DeclarationError(ValueError):
    """A declaration is invalid; the message says which field and why."""


@dataclass(frozen=True)
class WarmPolicy:
    min_replicas: int = 0
    max_replicas: int | None = None
    pinned: bool = False
    idle_timeout: str | None = None

    @property
    def idle_seconds(self) -> float | None:
        """``idleTimeout`` in seconds (e.g. "1h30m" -> 5400)."""
        return None if self.idle_timeout is None else _seconds(self.idle_timeout)


@dataclass(frozen=True)
class Serving:
    """How a model answers on the node socket: several declarations may serve one name,
    each as a version, and share its unpinned requests by weight."""

    name: str
    """The served name (``/v2/models/NAME``); default the declaration's metadata.name."""
    version: str = "1"
    traffic: int = 100
    """Relative weight among the ready versions of the name; 0: only pinned requests."""
    mirror: int = 0
    """Percent of the name's unpinned requests also sent here, answers discarded."""


@dataclass(frozen=True)
class ModelDeclaration:
    name: str
    source_uri: str
    model_size: int
    node_groups: tuple[str, ...]
    format: str | None = None
    entrypoint: str | None = None
    warm: WarmPolicy = field(default_factory=WarmPolicy)
    replicas: int | None = None
    # (max batch size, max queue delay in seconds) when dynamic batching is asked for.
    batching: tuple[int, float] | None = None
    # Whether this node holds the model warm. In a cluster the reconciler decides per
    # node; None (standalone) means: warm when it fits, else on the first request.
    keep_warm: bool | None = None
    storage: dict[str, Any] | None = field(default=None, compare=False)
    # None: serves as metadata.name, version "1", all of the name's traffic.
    serving: Serving = None  # type: ignore[assignment]  # filled in by __post_init__
    namespace: str | None = None
    """A LocalModelNamespaceCache's namespace: it answers only to that namespace's pods."""

    def __post_init__(self) -> None:
        if self.serving is None:
            object.__setattr__(self, "serving", Serving(self.name))

    @property
    def key(self) -> str:
        """The model's name on this node (store, host, status): unique even when two
        namespaces declare the same name."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def store_uri(self) -> str:
        """What the node's store calls this model's bytes: its source URI, scoped to its
        namespace for a namespaced cache, so a tenant's bytes for a URI (from an endpoint
        it chose) are never another scope's, nor the other way round."""
        return scoped(self.source_uri, self.namespace)

    def storage_parameters(self) -> dict[str, str] | None:
        """``spec.storage.parameters`` (plainHTTP, include/exclude globs, endpoints...),
        which a source reads before the environment."""
        raw = (self.storage or {}).get("parameters")
        if not isinstance(raw, dict):
            return None
        return {str(k): str(v) for k, v in raw.items() if isinstance(v, str | int | bool)}

    def same_model(self, other: ModelDeclaration) -> bool:
        """Whether ``other`` can keep this model's disk copy and loaded runtime."""
        return (self.source_uri, self.format, self.entrypoint) == (
            other.source_uri,
            other.format,
            other.entrypoint,
        )


def namespace_of_key(key: str) -> str | None:
    """The namespace in a :attr:`ModelDeclaration.key` (``NAMESPACE/NAME``), or None for a
    cluster cache's key or anything else (a declaration file's path is never one)."""
    namespace, slash, name = key.partition("/")
    if slash and _NAMESPACE.fullmatch(namespace) and _NAME.fullmatch(name):
        return namespace
    return None


def parse_declarations(text: str) -> list[ModelDeclaration]:
    """All declarations of one YAML file (one or several documents)."""
    try:
        docs = [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
    except yaml.YAMLError as exc:
        raise DeclarationError(f"not valid YAML: {exc}") from None
    except RecursionError:
        raise DeclarationError("not valid YAML: nested too deeply") from None
    if _expanded_size(docs, {}, 0) > MAX_VALUES:
        raise DeclarationError(
            f"the file expands to more than {MAX_VALUES} values (YAML aliases multiply them); "
            "a declaration needs a few dozen"
        )
    if not docs:
        raise DeclarationError("the file holds no declaration")
    return [_parse_one(doc, i) for i, doc in enumerate(docs)]


def _expanded_size(value: Any, sizes: dict[int, int], depth: int) -> int:
    """How many values ``value`` holds with every alias expanded, computed without expanding:
    an aliased mapping or list is the same object each time, so its size is counted once."""
    if not isinstance(value, (dict, list)):
        return 1
    known = sizes.get(id(value))
    if known is not None:
        return known
    if depth >= _MAX_DEPTH:  # also what a self-referencing alias (&a [*a]) comes to
        raise DeclarationError(f"not valid YAML: nested more than {_MAX_DEPTH} levels deep")
    children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, depth + 1)
        if size > MAX_VALUES:
            break
    sizes[id(value)] = size
    return size


def parse_object(doc: Any) -> ModelDeclaration:
    """One LocalModelCache or LocalModelNamespaceCache as the API server returns it."""
    return _parse_one(doc, 0, kinds=(*KINDS, "LocalModelNamespaceCache"))


def _parse_one(doc: Any, index: int, kinds: tuple[str, ...] = KINDS) -> ModelDeclaration:
    where = f"document {index + 1}"
    if not isinstance(doc, dict):
        raise DeclarationError(f"{where}: expected a mapping, got {type(doc).__name__}")
    if doc.get("apiVersion") != API_VERSION:
        raise DeclarationError(
            f"{where}: apiVersion must be {API_VERSION}, got {_quote(doc.get('apiVersion'))}"
        )
    if doc.get("kind") not in kinds:
        raise DeclarationError(
            f"{where}: kind must be {' or '.join(kinds)}, got {_quote(doc.get('kind'))}"
        )
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not _NAME.match(name):
        raise DeclarationError(
            f"{where}: metadata.name must be a lowercase DNS name "
            f"(a-z, 0-9, '-', '.'), got {_quote(name)}"
        )
    namespace = metadata.get("namespace") if doc["kind"] == "LocalModelNamespaceCache" else None
    if doc["kind"] == "LocalModelNamespaceCache" and (
        not isinstance(namespace, str) or not _NAME.match(namespace)
    ):
        raise DeclarationError(
            f"{where}: a LocalModelNamespaceCache needs metadata.namespace, got {_quote(namespace)}"
        )
    where = f"{doc['kind']} '{name}'"
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise DeclarationError(f"{where}: spec is missing")
    return ModelDeclaration(
        name=name,
        source_uri=_source_uri(where, spec),
        model_size=_model_size(where, spec),
        node_groups=_node_groups(where, spec),
        format=_format(where, spec),
        entrypoint=_entrypoint(where, spec),
        warm=_warm(where, spec.get("warm")),
        replicas=_optional_int(where, spec, "replicas", minimum=0),
        batching=_batching(where, spec.get("batching")),
        storage=spec.get("storage"),
        serving=_serving(where, name, spec.get("serving")),
        namespace=namespace,
    )


def refuse_duplicate_versions(
    declarations: dict[str, ModelDeclaration],
) -> tuple[dict[str, ModelDeclaration], dict[str, str]]:
    """The declarations without those that repeat an earlier one's (namespace, served
    name, version), and why each of those is refused (by key). Earlier in ``declarations``
    wins: the one already serving, since both modes keep their order stable."""
    kept: dict[str, ModelDeclaration] = {}
    refused: dict[str, str] = {}
    first: dict[tuple[str | None, str, str], str] = {}
    for key, decl in declarations.items():
        serving = decl.serving
        slot = (decl.namespace, serving.name, serving.version)
        holder = first.setdefault(slot, key)
        if holder != key:
            scope = f"namespace {decl.namespace}" if decl.namespace else "the cluster scope"
            refused[key] = (
                f"version {serving.version!r} of {serving.name!r} is already served by "
                f"{holder} in {scope}; give this one another spec.serving.version"
            )
            continue
        kept[key] = decl
    return kept, refused


def _source_uri(where: str, spec: dict[str, Any]) -> str:
    uri = spec.get("sourceModelUri")
    if not isinstance(uri, str) or not uri:
        raise DeclarationError(f"{where}: spec.sourceModelUri is required")
    try:
        return validate_source_uri(uri)
    except InvalidSourceError as exc:
        raise DeclarationError(f"{where}: spec.sourceModelUri: {exc}") from None


def _model_size(where: str, spec: dict[str, Any]) -> int:
    raw = spec.get("modelSize")
    if raw is None:
        raise DeclarationError(f"{where}: spec.modelSize is required (e.g. 500Mi)")
    try:
        size = parse_quantity(raw)  # a Decimal
        if not size.is_finite():
            raise ValueError(raw)
    except (ValueError, TypeError, ArithmeticError):  # decimal's Overflow and NaN included
        raise DeclarationError(
            f"{where}: spec.modelSize {_quote(raw)} is not a Kubernetes quantity (e.g. 500Mi, 2Gi)"
        ) from None
    if not 1 <= size <= _MAX_SIZE:
        raise DeclarationError(
            f"{where}: spec.modelSize must be positive and at most 8Ei, got {_quote(raw)}"
        )
    return int(size)


def _node_groups(where: str, spec: dict[str, Any]) -> tuple[str, ...]:
    groups = spec.get("nodeGroups")
    if (
        not isinstance(groups, list)
        or not groups
        or not all(isinstance(g, str) and g for g in groups)
    ):
        raise DeclarationError(f"{where}: spec.nodeGroups must be a list of at least one name")
    return tuple(groups)


def _format(where: str, spec: dict[str, Any]) -> str | None:
    fmt, runtime = spec.get("format"), spec.get("runtime")
    for key, value in (("format", fmt), ("runtime", runtime)):
        if value is not None and value not in FORMATS:
            raise DeclarationError(
                f"{where}: spec.{key} must be one of {', '.join(FORMATS)}, got {_quote(value)}"
            )
    # The one mix allowed: torch weights whose module class is code from the source.
    if (
        fmt is not None
        and runtime is not None
        and fmt != runtime
        and (fmt, runtime)
        != (
            "torch",
            "python",
        )
    ):
        raise DeclarationError(f"{where}: spec.format and spec.runtime disagree")
    effective = fmt or runtime
    # Running code from a model source is a decision, never a default or a guess.
    if effective == "python" and runtime != "python":
        raise DeclarationError(
            f"{where}: a python model runs code from its source; opt in with spec.runtime: python"
        )
    if spec.get("entrypoint") is not None and runtime != "python":
        raise DeclarationError(
            f"{where}: spec.entrypoint runs code from the model source; "
            "it needs spec.runtime: python"
        )
    if effective == "python" and spec.get("entrypoint") is None:
        raise DeclarationError(f"{where}: spec.runtime python needs spec.entrypoint: module:Class")
    return effective


def _entrypoint(where: str, spec: dict[str, Any]) -> str | None:
    entrypoint = spec.get("entrypoint")
    if entrypoint is None:
        return None
    if not isinstance(entrypoint, str) or not _ENTRYPOINT.match(entrypoint):
        raise DeclarationError(f"{where}: spec.entrypoint must look like 'module:Class'")
    return entrypoint


def _optional_int(where: str, spec: dict[str, Any], key: str, *, minimum: int) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    # At most int32, as the CRD's integer fields: no count that no loop could ever reach.
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**31:
        raise DeclarationError(
            f"{where}: {key} must be an integer >= {minimum} (int32), got {_quote(value)}"
        )
    return value


def _batching(where: str, raw: Any) -> tuple[int, float] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DeclarationError(f"{where}: spec.batching must be a mapping")
    where = f"{where}: spec.batching"
    size = _optional_int(where, raw, "maxBatchSize", minimum=1)
    if size is None:
        raise DeclarationError(f"{where}.maxBatchSize is required (e.g. 16)")
    delay = raw.get("maxQueueDelay", "1ms")
    if (
        not isinstance(delay, str)
        or not _DURATION.match(delay)
        or _seconds(delay) > _MAX_QUEUE_DELAY
    ):
        raise DeclarationError(
            f"{where}.maxQueueDelay must be a duration like 500us, 2ms or 1s, "
            f"at most {_MAX_QUEUE_DELAY:.0f}s"
        )
    return size, _seconds(delay)


def _seconds(duration: str) -> float:
    units = {"us": 1e-6, "ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in _DURATION_PART.findall(duration))


def _serving(where: str, name: str, raw: Any) -> Serving:
    if raw is None:
        return Serving(name)
    if not isinstance(raw, dict):
        raise DeclarationError(f"{where}: spec.serving must be a mapping")
    where = f"{where}: spec.serving"
    served = raw.get("name", name)
    if not isinstance(served, str) or not _NAME.match(served):
        raise DeclarationError(
            f"{where}.name must be a lowercase DNS name (a-z, 0-9, '-', '.'), got {_quote(served)}"
        )
    version = raw.get("version", "1")
    # "." and ".." fit the pattern but clients rewrite them out of /versions/../infer: such a
    # version could never be pinned over REST (the CRD refuses them too).
    if not isinstance(version, str) or not _VERSION.match(version) or version in (".", ".."):
        raise DeclarationError(
            f"{where}.version must be a string of 1 to 64 of A-Z a-z 0-9 . _ - "
            f'(quote numbers: "2"), got {_quote(version)}'
        )
    traffic = _optional_int(where, raw, "traffic", minimum=0)
    mirror = _optional_int(where, raw, "mirror", minimum=0)
    if mirror is not None and mirror > 100:
        raise DeclarationError(f"{where}: mirror is a percent (0 to 100), got {mirror}")
    return Serving(served, version, 100 if traffic is None else traffic, mirror or 0)


def _warm(where: str, raw: Any) -> WarmPolicy:
    if raw is None:
        return WarmPolicy()
    if not isinstance(raw, dict):
        raise DeclarationError(f"{where}: spec.warm must be a mapping")
    where = f"{where}: spec.warm"
    min_replicas = _optional_int(where, raw, "minReplicas", minimum=0) or 0
    max_replicas = _optional_int(where, raw, "maxReplicas", minimum=0)
    if max_replicas is not None and max_replicas < min_replicas:
        raise DeclarationError(f"{where}: minReplicas must not exceed maxReplicas")
    pinned = raw.get("pinned", False)
    if not isinstance(pinned, bool):
        raise DeclarationError(f"{where}.pinned must be true or false")
    idle = raw.get("idleTimeout")
    if idle is not None and (not isinstance(idle, str) or not _DURATION.match(idle)):
        raise DeclarationError(f"{where}.idleTimeout must be a duration like 90s, 10m or 1h")
    return WarmPolicy(min_replicas, max_replicas, pinned, idle)
