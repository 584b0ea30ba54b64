"""A fake Kubernetes API server: the semantics nodecache depends on, nothing more.

resourceVersion from one global counter, uid, generation (bumped on spec changes only),
creationTimestamp, finalizers and deletionTimestamp, 409 on a stale resourceVersion and on
AlreadyExists, 404, merge-patch and JSON patch, label and field selectors, list with
resourceVersion and limit/continue, watch (JSON lines) with ADDED/MODIFIED/DELETED,
BOOKMARK when asked and 410 Gone for compacted versions, /status and /scale subresources,
label keys and values (422, any kind), CRD schema and CEL validation (422). Runs an
aiohttp app on 127.0.0.1 in its own thread; ``stop()``/``start()`` take it away and bring it
back on the same port with the same state.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import json
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import yaml
from aiohttp import web
from kubernetes import client

from . import discovery
from .meta import label_problems
from .schema import load_crds, prune, validate_object
from .selection import field_matches, label_matches

__all__ = ["FakeApiServer", "ResourceType"]

JSON = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = False
    schema: JSON | None = None
    scale: JSON | None = None
    fields: tuple[str, ...] = ("metadata.name", "metadata.namespace")
    crd: JSON | None = None
    columns: tuple[JSON, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


ENFORCED = frozenset({"secrets"})
"""Resources whose every request is authorized against daemonset/rbac and the RoleBindings
stored in the fake; for the rest, ``rbac.denied_calls`` checks the record afterwards."""


def _builtin_types() -> list[ResourceType]:
    meta = ("metadata.name", "metadata.namespace")
    return [
        ResourceType("", "v1", "nodes", "Node", False, True, fields=(*meta, "spec.unschedulable")),
        ResourceType(
            "", "v1", "pods", "Pod", True, True, fields=(*meta, "spec.nodeName", "status.phase")
        ),
        ResourceType("", "v1", "events", "Event", True, fields=(*meta, "involvedObject.name")),
        ResourceType("events.k8s.io", "v1", "events", "Event", True),
        ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
        ResourceType("", "v1", "secrets", "Secret", True, fields=meta),
        ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ]


def _crd_types() -> list[ResourceType]:
    out = []
    for crd in load_crds().values():
        out.append(
            ResourceType(
                crd.group,
                crd.version,
                crd.plural,
                crd.kind,
                crd.namespaced,
                "status" in crd.subresources,
                crd.schema,
                crd.subresources.get("scale"),
                crd=crd.crd,
                columns=tuple(crd.crd["spec"]["versions"][0].get("additionalPrinterColumns", [])),
            )
        )
    return out


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> JSON:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }

    def response(self) -> web.Response:
        return web.json_response(self.status(), status=self.code)


@dataclass
class Event:
    rv: int
    type: str
    rtype: ResourceType
    old: JSON | None
    new: JSON


@dataclass
class _State:
    rv: int = 0
    objects: dict[tuple[str, str, str, str], JSON] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)
    compacted_rv: int = 0  # watches from below this answer 410


class FakeApiServer:
    """The fake; ``configuration()`` gives a kubernetes client Configuration for it."""

    def __init__(self, *, bookmark_interval: float = 0.5, history_limit: int = 10_000) -> None:
        self.types = {(t.group, t.plural): t for t in _builtin_types() + _crd_types()}
        self.bookmark_interval = bookmark_interval
        self.history_limit = history_limit
        self.state = _State()
        self.requests: list[tuple[str, str]] = []  # (method, path?query) seen, for tests
        self.calls: list[tuple[str, str, str]] = []  # (token, method, path?query)
        self.pruned: list[str] = []  # "<kind>/<name>" whose writes carried unknown fields
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._changed = asyncio.Event()  # replaced by a fresh one on every change
        self._runner: web.AppRunner | None = None

    # -- lifecycle (called from the test's thread) ----------------------------

    def start(self) -> FakeApiServer:
        self._call(self._start())
        return self

    def stop(self) -> None:
        """Go away (connections drop, the port refuses) but keep every object."""
        self._call(self._stop())

    def close(self) -> None:
        self.stop()

        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self._call(cancel_rest())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def compact(self) -> None:
        """Forget history, as etcd compaction does: older watches get 410 Gone."""

        async def go() -> None:
            self.state.history.clear()
            self.state.compacted_rv = self.state.rv
            self._notify()

        self._call(go())

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configuration(self) -> client.Configuration:
        config = client.Configuration()
        config.host = self.url
        return config

    def write_kubeconfig(self, path: Path, user: str = "fake") -> Path:
        """A kubeconfig for the fake; ``user`` becomes the bearer token, seen in ``calls``."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": user}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port or 0)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _stop(self) -> None:
        if self._runner is not None:
            self._notify()
            await self._runner.cleanup()
            self._runner = None

    # -- routing --------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        user = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.calls.append((user, request.method, request.path_qs))
        try:
            if request.method == "GET" and (found := self._discovery(request.path)) is not None:
                return web.json_response(found)
            rtype, namespace, name, sub = self.route(request.path)
            if rtype.plural in ENFORCED:  # as the apiserver's RBAC authorizer does
                from .rbac import authorize  # (rbac imports this module)

                authorize(self, user, request.method, rtype, namespace, name)
            table = rtype.columns and discovery.wants_table(request.headers.get("Accept", ""))
            if request.method == "GET" and name is None:
                if request.query.get("watch") in ("true", "1"):
                    return await self._watch(request, rtype, namespace)
                listing = self._list(request, rtype, namespace)
                if table:
                    rv = listing["metadata"]["resourceVersion"]
                    return web.json_response(
                        discovery.table(list(rtype.columns), listing["items"], rv)
                    )
                return web.json_response(listing)
            if request.method == "GET" and table and sub is None:
                obj = self._lookup(rtype, namespace, name)  # type: ignore[arg-type]
                rv = obj["metadata"]["resourceVersion"]
                return web.json_response(discovery.table(list(rtype.columns), [obj], rv))
            if request.method == "POST" and name is None:
                return web.json_response(await self._create(request, rtype, namespace), status=201)
            if name is None:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
            handler = {
                "GET": self._get,
                "PUT": self._update,
                "PATCH": self._update,
                "DELETE": self._delete,
            }.get(request.method)
            if handler is None:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
            return web.json_response(await handler(request, rtype, namespace, name, sub))
        except ApiError as exc:
            return exc.response()

    def _discovery(self, path: str) -> JSON | None:
        """Discovery documents (kubectl asks for them before anything else)."""
        parts = [p for p in path.split("/") if p]
        types = list(self.types.values())
        if parts == ["version"]:
            return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-nodecache-fake"}
        if parts == ["api"]:
            return discovery.api_versions(f"127.0.0.1:{self.port}")
        if parts == ["apis"]:
            return discovery.api_group_list(types)
        if parts == ["api", "v1"] or (parts[:1] == ["apis"] and len(parts) == 3):
            group, version = ("", "v1") if parts[0] == "api" else (parts[1], parts[2])
            mine = [t for t in types if (t.group, t.version) == (group, version)]
            if not mine:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return discovery.resource_list(f"{group}/{version}" if group else version, mine)
        return None

    def route(self, path: str) -> tuple[ResourceType, str | None, str | None, str | None]:
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 3:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, rest = parts[1], parts[3:]
        else:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource {path}"
            )
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        rtype = self.types.get((group, rest[0]))
        cluster_wide_list = rtype is not None and namespace is None and len(rest) == 1
        bad = rtype is None or len(rest) > 3 or (namespace is not None) != rtype.namespaced
        if bad and not cluster_wide_list:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and not (
            (sub == "status" and rtype.status) or (sub == "scale" and rtype.scale)
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rtype, namespace, name, sub

    # -- reads ----------------------------------------------------------------

    def _key(self, rtype: ResourceType, namespace: str | None, name: str) -> tuple[str, ...]:
        return (rtype.group, rtype.plural, namespace or "", name)

    def _lookup(self, rtype: ResourceType, namespace: str | None, name: str) -> JSON:
        obj = self.state.objects.get(self._key(rtype, namespace, name))  # type: ignore[arg-type]
        if obj is None:
            raise ApiError(404, "NotFound", f'{rtype.qualified} "{name}" not found')
        return obj

    def _selected(self, request: web.Request, rtype: ResourceType) -> Any:
        labels = request.query.get("labelSelector", "")
        fields = request.query.get("fieldSelector", "")
        for term in filter(None, fields.split(",")):
            path = term.replace("!=", "=").replace("==", "=").split("=")[0]
            if path not in rtype.fields:
                raise ApiError(
                    400, "BadRequest", f'field label not supported: "{path}" for {rtype.kind}'
                )
        try:
            label_matches(labels, {})
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {exc}") from None
        return lambda o: (
            label_matches(labels, o["metadata"].get("labels") or {}) and (field_matches(fields, o))
        )

    def _list(self, request: web.Request, rtype: ResourceType, namespace: str | None) -> JSON:
        match = self._selected(request, rtype)
        items = sorted(
            (
                o
                for (g, p, ns, _), o in self.state.objects.items()
                if (g, p) == (rtype.group, rtype.plural)
                and (namespace is None or ns == namespace)
                and match(o)
            ),
            key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]),
        )
        meta: JSON = {"resourceVersion": str(self.state.rv)}
        start = 0
        if request.query.get("continue"):
            start = int(base64.b64decode(request.query["continue"]))
        limit = int(request.query.get("limit") or 0)
        if limit and start + limit < len(items):
            meta["continue"] = base64.b64encode(str(start + limit).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
            items = items[start : start + limit]
        else:
            items = items[start:]
        return {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": meta,
            "items": items,
        }

    async def _get(
        self, request: web.Request, rtype: ResourceType, ns: str | None, name: str, sub: str | None
    ) -> JSON:
        obj = self._lookup(rtype, ns, name)
        return self._scale(rtype, obj) if sub == "scale" else obj

    def _scale(self, rtype: ResourceType, obj: JSON) -> JSON:
        assert rtype.scale is not None
        meta = obj["metadata"]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": _get_path(obj, rtype.scale["specReplicasPath"]) or 0},
            "status": {
                "replicas": _get_path(obj, rtype.scale["statusReplicasPath"]) or 0,
                **(
                    {"selector": sel}
                    if (sel := _get_path(obj, rtype.scale.get("labelSelectorPath", "")))
                    else {}
                ),
            },
        }

    # -- writes ---------------------------------------------------------------

    async def _create(self, request: web.Request, rtype: ResourceType, ns: str | None) -> JSON:
        obj = await _body(request)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name: Required value: name is required")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if ns is not None:
            if meta.get("namespace", ns) != ns:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match")
            meta["namespace"] = ns
        key = self._key(rtype, ns, meta["name"])
        if key in self.state.objects:
            raise ApiError(
                409, "AlreadyExists", f'{rtype.qualified} "{meta["name"]}" already exists'
            )
        if rtype.status:
            obj.pop("status", None)  # status is written through /status only
        obj = self._admit(rtype, obj, None)
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(k, None)
        meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=_now())
        obj["metadata"] = meta
        await self._commit("ADDED", rtype, key, None, obj)
        return obj

    async def _update(
        self, request: web.Request, rtype: ResourceType, ns: str | None, name: str, sub: str | None
    ) -> JSON:
        key = self._key(rtype, ns, name)
        old = self._lookup(rtype, ns, name)
        body = await _body(request)
        current = self._scale(rtype, old) if sub == "scale" else copy.deepcopy(old)
        if request.method == "PUT":
            new = body
        else:
            kind = request.content_type
            if kind == "application/json-patch+json":
                try:
                    new = jsonpatch.apply_patch(current, body)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise ApiError(422, "Invalid", f"the JSON patch failed: {exc}") from None
            elif kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                new = _merge_patch(current, body)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {kind}")
        wanted_rv = (new.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rtype.qualified} "{name}": the object has '
                "been modified; please apply your changes to the latest version and try again",
            )
        if sub == "scale":
            replicas = (new.get("spec") or {}).get("replicas")
            new = copy.deepcopy(old)
            assert rtype.scale is not None
            _set_path(new, rtype.scale["specReplicasPath"], replicas)
        elif sub == "status":
            new, status = copy.deepcopy(old), new.get("status")
            new.pop("status", None)
            if status is not None:
                new["status"] = status
        elif rtype.status:
            new.pop("status", None)
            if "status" in old:
                new["status"] = old["status"]
        meta = new.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        for k in ("name", "namespace", "uid", "creationTimestamp", "generation",
                  "deletionTimestamp", "deletionGracePeriodSeconds"):  # fmt: skip
            meta.pop(k, None)
            if k in old["metadata"]:
                meta[k] = old["metadata"][k]
        if "deletionTimestamp" in old["metadata"] and len(meta.get("finalizers") or []) > len(
            old["metadata"].get("finalizers") or []
        ):
            raise ApiError(
                422, "Invalid", "no new finalizers can be added if the object is being deleted"
            )
        new = self._admit(rtype, new, old)
        if _spec_of(new) != _spec_of(old):
            meta["generation"] = old["metadata"].get("generation", 1) + 1
        if "deletionTimestamp" in meta and not meta.get("finalizers"):
            await self._commit("DELETED", rtype, key, old, new)
            return new
        await self._commit("MODIFIED", rtype, key, old, new)
        return self._scale(rtype, new) if sub == "scale" else new

    async def _delete(
        self, request: web.Request, rtype: ResourceType, ns: str | None, name: str, sub: str | None
    ) -> JSON:
        if sub is not None:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
        old = self._lookup(rtype, ns, name)
        options = await _body(request) if request.can_read_body else {}
        pre = options.get("preconditions") or {}
        if pre.get("resourceVersion") not in (None, old["metadata"]["resourceVersion"]) or pre.get(
            "uid"
        ) not in (None, old["metadata"]["uid"]):
            raise ApiError(409, "Conflict", f'Precondition failed for {rtype.qualified} "{name}"')
        key = self._key(rtype, ns, name)
        if old["metadata"].get("finalizers"):
            if "deletionTimestamp" in old["metadata"]:
                return old
            new = copy.deepcopy(old)
            new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            await self._commit("MODIFIED", rtype, key, old, new)
            return new
        await self._commit("DELETED", rtype, key, old, copy.deepcopy(old))
        return self.state.objects.get(key) or old

    def _admit(self, rtype: ResourceType, obj: JSON, old: JSON | None) -> JSON:
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        for i, ref in enumerate(obj["metadata"].get("ownerReferences") or []):
            for key in ("apiVersion", "kind", "name", "uid"):
                if not ref.get(key):
                    raise ApiError(422, "Invalid", f"metadata.ownerReferences[{i}].{key}: "
                                   "Required value")  # fmt: skip
        if problems := label_problems(obj["metadata"]):
            kind = f"{rtype.kind}.{rtype.group}" if rtype.group else rtype.kind
            name = obj["metadata"].get("name")
            raise ApiError(422, "Invalid", f'{kind} "{name}" is invalid: ' + "; ".join(problems))
        if rtype.schema is None:
            return obj
        kept = prune(rtype.schema, obj)
        if kept != obj:  # the apiserver drops these silently: tests want to know
            self.pruned.append(f"{rtype.kind}/{obj['metadata'].get('name')}")
        obj = kept
        problems = validate_object(rtype.schema, obj, old)
        if problems:
            name = obj["metadata"].get("name")
            raise ApiError(
                422,
                "Invalid",
                f'{rtype.kind}.{rtype.group} "{name}" is invalid: ' + "; ".join(problems),
            )
        return obj

    async def _commit(
        self, kind: str, rtype: ResourceType, key: Any, old: JSON | None, new: JSON
    ) -> None:
        self.state.rv += 1
        new["metadata"]["resourceVersion"] = str(self.state.rv)
        if kind == "DELETED":
            self.state.objects.pop(key, None)
        else:
            self.state.objects[key] = new
        history = self.state.history
        history.append(Event(self.state.rv, kind, rtype, old, copy.deepcopy(new)))
        if len(history) > self.history_limit:
            dropped = history[: len(history) - self.history_limit]
            del history[: len(dropped)]
            self.state.compacted_rv = dropped[-1].rv
        self._notify()

    # -- watch ----------------------------------------------------------------

    async def _watch(
        self, request: web.Request, rtype: ResourceType, ns: str | None
    ) -> web.StreamResponse:
        match = self._selected(request, rtype)
        rv_text = request.query.get("resourceVersion", "")
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(kind: str, obj: JSON) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        def mine(event: Event) -> bool:
            same = (event.rtype.group, event.rtype.plural) == (rtype.group, rtype.plural)
            return same and (ns is None or event.new["metadata"].get("namespace") == ns)

        if rv_text in ("", "0"):
            since = self.state.rv
            for obj in self._list(request, rtype, ns)["items"]:
                await send("ADDED", obj)
        else:
            since = int(rv_text)
            if since < self.state.compacted_rv:
                gone = ApiError(410, "Expired", f"too old resource version: {since} "
                                f"({self.state.compacted_rv})").status()  # fmt: skip
                await send("ERROR", gone)
                return response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval
        runner = self._runner
        try:
            while loop.time() < deadline and self._runner is runner:
                changed = self._changed  # taken before reading history: no change is missed
                if since < self.state.compacted_rv:
                    await send(
                        "ERROR", ApiError(410, "Expired", "too old resource version").status()
                    )
                    return response
                for event in [e for e in self.state.history if e.rv > since]:
                    since = event.rv
                    if not mine(event):
                        continue
                    was = event.old is not None and event.type != "ADDED" and match(event.old)
                    now = match(event.new)
                    if event.type == "DELETED":
                        kind = "DELETED" if was else None
                    else:
                        kind = {(True, True): "MODIFIED", (False, True): "ADDED",
                                (True, False): "DELETED"}.get((was, now))  # fmt: skip
                    if kind:
                        await send(kind, event.new)
                if bookmarks and loop.time() >= next_bookmark:
                    meta = {"resourceVersion": str(self.state.rv)}
                    await send("BOOKMARK", {"kind": rtype.kind, "apiVersion": rtype.api_version,
                                            "metadata": meta})  # fmt: skip
                    next_bookmark = loop.time() + self.bookmark_interval
                wait = min(deadline, next_bookmark) - loop.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(0.01, wait))
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        return response


async def _body(request: web.Request) -> JSON:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict | list):
        raise ApiError(400, "BadRequest", "the body must be a JSON object")
    return data  # type: ignore[return-value]


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _spec_of(obj: JSON) -> JSON:
    """Everything generation counts: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _get_path(obj: JSON, path: str) -> Any:
    for part in filter(None, path.split(".")):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)  # type: ignore[assignment]
    return obj


def _set_path(obj: JSON, path: str, value: Any) -> None:
    parts = [p for p in path.split(".") if p]
    for part in parts[:-1]:
        obj = obj.setdefault(part, {})
    obj[parts[-1]] = value


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
