"""Which model answers a request for a served name: versions, weights, namespaces.

Pure decisions over plain data: the routes the agent declared, which of their models are
ready, the caller's namespace and a random draw go in; a route (the model's key on this
node) comes out, or the error the caller gets. Both dataplanes (in-process and the
worker pool's router) ask it on every request, so it is built once per change of the
declarations and each decision is a few dict lookups.

Rules, as issue 16 states them:
- A caller sees a name's versions in its own namespace if its namespace declares the
  name (that shadows a cluster cache of the same name), else the cluster's versions.
- An unpinned request goes to one of the versions with ``traffic > 0``, at random in
  proportion to their weights, among those that are warm; when none of them is, among
  those registered (they load on demand, as a single model always did); none registered:
  503 with Retry-After. A new version therefore takes traffic once it is warm, when the
  others are.
- A pinned request (a version named) goes to that version whatever its weight.
- ``mirror: P`` versions get a copy of P% of the name's unpinned requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nodecache.serve.errors import ModelNotFound, ModelNotReady
from nodecache.serve.spec import ModelState

__all__ = ["Caller", "Route", "Router", "RoutingTable", "StateOf", "nobody"]

StateOf = Callable[[str], "ModelState | None"]
"""A model key's state on this node's host; None: not registered (still downloading)."""
Caller = Callable[[], "str | None"]
"""The caller's namespace, asked only when a name depends on it (it costs a /proc read)."""


def nobody() -> str | None:
    """The caller of a transport that cannot name its pod (gRPC, TCP): no namespace."""
    return None


@dataclass(frozen=True)
class Route:
    """One declared version of a served name."""

    key: str
    """The model's name on this node: repository, pool, status and metrics use it."""
    name: str
    version: str = "1"
    traffic: int = 100
    mirror: int = 0
    namespace: str | None = None
    """A LocalModelNamespaceCache's: only that namespace's pods see the route."""
    allowed: frozenset[str] | None = None
    """A cluster cache's ``allowedNamespaces`` (None: any caller)."""

    def admits(self, namespace: str | None) -> bool:
        if self.namespace is not None:
            return namespace == self.namespace
        return self.allowed is None or namespace in self.allowed


class RoutingTable:
    """The routes of one set of declarations, indexed by (namespace, served name)."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self.routes = tuple(sorted(routes, key=lambda r: (r.namespace or "", r.name, r.version)))
        self._by_key = {r.key: r for r in self.routes}
        self._scopes: dict[tuple[str | None, str], tuple[Route, ...]] = {}
        for route in self.routes:
            scope = (route.namespace, route.name)
            self._scopes[scope] = (*self._scopes.get(scope, ()), route)
        # Names whose answer depends on who calls: only these read the caller's namespace.
        self._scoped = {r.name for r in self.routes if r.namespace or r.allowed is not None}

    def route(self, key: str) -> Route | None:
        return self._by_key.get(key)

    def knows(self, name: str) -> bool:
        """Whether any scope declares ``name`` (for metric labels and 404s)."""
        return name in self._scoped or (None, name) in self._scopes

    def versions(self, name: str, caller: Caller) -> tuple[Route, ...]:
        """The versions of ``name`` the caller may use; ModelNotFound (404) if none is
        declared, and also if all are another namespace's or closed to the caller's: as
        Kubernetes does, a caller learns nothing of what it may not use, not even that it
        exists (nor which namespaces own it)."""
        if name not in self._scoped:
            found = self._scopes.get((None, name))
            if found is None:
                raise ModelNotFound(name)
            return found
        namespace = caller()
        own = self._scopes.get((namespace, name)) if namespace is not None else None
        if own:
            return own
        usable = tuple(r for r in self._scopes.get((None, name), ()) if r.admits(namespace))
        if not usable:
            raise ModelNotFound(name)
        return usable

    def choose(
        self,
        name: str,
        version: str | None,
        caller: Caller,
        state_of: StateOf,
        draw: float,
        reason_of: Callable[[str], str | None] = lambda _: None,
    ) -> Route:
        """The version that answers: the pinned one, else a weighted pick (``draw`` in
        [0, 1)) among the warm versions with traffic, else among the registered ones."""
        versions = self.versions(name, caller)
        if version is not None:
            for route in versions:
                if route.version == version:
                    if state_of(route.key) is None:
                        raise ModelNotReady(
                            f"version {version} of model '{name}' is not ready"
                            + _because(reason_of(route.key))
                        )
                    return route
            raise ModelNotFound(name, version)
        if len(versions) == 1 and versions[0].traffic > 0:  # the common case, kept cheap
            if state_of(versions[0].key) is None:
                raise ModelNotReady(
                    f"model '{name}' is not ready" + _because(reason_of(versions[0].key))
                )
            return versions[0]
        weighted = [r for r in versions if r.traffic > 0]
        if not weighted:
            raise ModelNotReady(
                f"every version of model '{name}' has traffic 0; "
                "name one (/v2/models/NAME/versions/VERSION)"
            )
        states = [state_of(r.key) for r in weighted]
        warm = [r for r, s in zip(weighted, states, strict=True) if s == ModelState.WARM]
        pool = warm or [r for r, s in zip(weighted, states, strict=True) if s is not None]
        if not pool:
            reasons = "; ".join(f"{r.version}: {reason_of(r.key) or 'Pending'}" for r in weighted)
            raise ModelNotReady(f"no version of model '{name}' is ready yet ({reasons})")
        return pick(pool, draw)

    def main(self, name: str, version: str | None, caller: Caller, state_of: StateOf) -> Route:
        """The version metadata describes: the named one, else the registered version with
        the most traffic, warm ones first (the same answer every time)."""
        if version is not None:
            return self.choose(name, version, caller, state_of, 0.0)
        registered = [(r, s) for r in self.versions(name, caller) if (s := state_of(r.key))]
        if not registered:
            raise ModelNotReady(f"no version of model '{name}' is ready yet")
        return max(registered, key=lambda rs: (rs[1] == ModelState.WARM, rs[0].traffic))[0]

    def mirrors(
        self, name: str, primary: Route, caller: Caller, draw: Callable[[], float]
    ) -> list[Route]:
        """The versions that get a copy of an unpinned request ``primary`` answers."""
        return [
            r
            for r in self.versions(name, caller)
            if r.mirror > 0 and r is not primary and draw() * 100 < r.mirror
        ]

    def has_mirrors(self, name: str) -> bool:
        return any(r.mirror > 0 for r in self.routes if r.name == name)

    def visible(self, caller: Caller) -> list[Route]:
        """Every route the caller may use, as ``versions`` would resolve each name."""
        namespace: str | None = None
        if self._scoped:
            namespace = caller()
        shown: list[Route] = []
        names = {r.name for r in self.routes}
        for name in sorted(names):
            own = self._scopes.get((namespace, name)) if namespace is not None else None
            candidates = own or self._scopes.get((None, name), ())
            shown.extend(r for r in candidates if r.admits(namespace))
        return shown


def _because(reason: str | None) -> str:
    return f": {reason}" if reason else ""


def pick(routes: list[Route], draw: float) -> Route:
    """The route whose share of the total weight ``draw`` (in [0, 1)) falls in."""
    total = sum(r.traffic for r in routes)
    point = draw * total
    for route in routes:
        point -= route.traffic
        if point < 0:
            return route
    return routes[-1]  # draw * total rounded up to total


class Router:
    """The current table, replaced whole when the declarations change (no lock needed:
    a request reads one table from start to end)."""

    def __init__(self, table: RoutingTable | None = None) -> None:
        self.table = table or RoutingTable()

    def update(self, routes: Iterable[Route]) -> None:
        self.table = RoutingTable(routes)
