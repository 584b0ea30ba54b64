"""Which version answers a served name, from plain routes and states, without servers.

End to end (real agents, REST, gRPC, workers) in tests/test_versions.py."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from nodecache.serve.errors import ModelNotFound, ModelNotReady
from nodecache.serve.routing import Route, RoutingTable, pick
from nodecache.serve.spec import ModelState

WARM, DOWNLOADED, LOADING = ModelState.WARM, ModelState.DOWNLOADED, ModelState.LOADING
NOBODY = lambda: None  # noqa: E731  (a caller outside any pod)


def ns(name: str | None) -> Callable[[], str | None]:
    return lambda: name


def states(**by_key: ModelState | None) -> Callable[[str], ModelState | None]:
    return lambda key: by_key.get(key.replace("/", "_"))


FRAUD = [
    Route("fraud-v1", "fraud", "1", traffic=90),
    Route("fraud-v2", "fraud", "2", traffic=10),
    Route("fraud-v3", "fraud", "3", traffic=0),
]


def test_unpinned_requests_split_by_weight_among_warm_versions() -> None:
    table = RoutingTable(FRAUD)
    state = states(**{"fraud-v1": WARM, "fraud-v2": WARM, "fraud-v3": WARM})
    draws = random.Random(7)
    picks = [
        table.choose("fraud", None, NOBODY, state, draws.random()).version for _ in range(10_000)
    ]
    assert picks.count("3") == 0  # traffic 0: pinned requests only
    assert 8_800 < picks.count("1") < 9_200


def test_pick_covers_the_whole_draw_range() -> None:
    routes = FRAUD[:2]
    assert pick(routes, 0.0).version == "1"
    assert pick(routes, 0.8999).version == "1"
    assert pick(routes, 0.9).version == "2"
    assert pick(routes, 0.99999999).version == "2"


def test_pinned_versions_resolve_whatever_their_weight() -> None:
    table = RoutingTable(FRAUD)
    state = states(**{"fraud-v1": WARM, "fraud-v3": DOWNLOADED})
    assert table.choose("fraud", "3", NOBODY, state, 0.0).key == "fraud-v3"
    with pytest.raises(ModelNotReady, match="version 2 of model 'fraud' is not ready"):
        table.choose("fraud", "2", NOBODY, state, 0.0)  # declared, still downloading
    with pytest.raises(ModelNotFound, match="version '4' not found"):
        table.choose("fraud", "4", NOBODY, state, 0.0)
    with pytest.raises(ModelNotFound, match="model 'other' not found"):
        table.choose("other", None, NOBODY, state, 0.0)


def test_a_new_version_takes_traffic_once_warm_when_another_is() -> None:
    table = RoutingTable(FRAUD)
    loading = states(**{"fraud-v1": WARM, "fraud-v2": LOADING})
    assert {table.choose("fraud", None, NOBODY, loading, d / 10).key for d in range(10)} == {
        "fraud-v1"
    }
    # Nothing warm (a cold start, or only the new one registered): requests wait for a load.
    cold = states(**{"fraud-v2": DOWNLOADED})
    assert table.choose("fraud", None, NOBODY, cold, 0.0).key == "fraud-v2"
    with pytest.raises(ModelNotReady) as refused:
        table.choose("fraud", None, NOBODY, states(), 0.0)
    assert refused.value.retry_after


def test_only_pinned_versions_left_is_a_503_that_says_how_to_pin() -> None:
    table = RoutingTable([Route("a", "fraud", "1", traffic=0)])
    with pytest.raises(ModelNotReady, match="traffic 0"):
        table.choose("fraud", None, NOBODY, states(a=WARM), 0.5)


def test_namespaces_shadow_the_cluster_for_their_own_pods_only() -> None:
    table = RoutingTable(
        [
            Route("fraud", "fraud"),
            Route("team-a/fraud", "fraud", namespace="team-a"),
            Route("team-b/fraud", "fraud", namespace="team-b"),
            Route("team-b/only", "only", namespace="team-b"),
        ]
    )
    ready = states(fraud=WARM, **{"team-a_fraud": WARM, "team-b_fraud": WARM, "team-b_only": WARM})
    for caller, key in ((ns("team-a"), "team-a/fraud"), (ns("team-b"), "team-b/fraud"),
                        (ns("team-c"), "fraud"), (NOBODY, "fraud")):  # fmt: skip
        assert table.choose("fraud", None, caller, ready, 0.3).key == key
    assert table.choose("only", None, ns("team-b"), ready, 0.3).key == "team-b/only"
    # Another namespace's model is "not found", as an undeclared one: no owner named.
    with pytest.raises(ModelNotFound) as refused:
        table.choose("only", None, ns("team-a"), ready, 0.3)
    assert str(refused.value) == str(ModelNotFound("only")) and "team-b" not in str(refused.value)
    assert [r.key for r in table.visible(ns("team-a"))] == ["team-a/fraud"]
    assert [r.key for r in table.visible(ns("team-b"))] == ["team-b/fraud", "team-b/only"]
    assert [r.key for r in table.visible(NOBODY)] == ["fraud"]


def test_allowed_namespaces_close_a_cluster_cache() -> None:
    table = RoutingTable([Route("m", "m", allowed=frozenset({"ops"})), Route("open", "open")])
    ready = states(m=WARM, open=WARM)
    assert table.choose("m", None, ns("ops"), ready, 0).key == "m"
    with pytest.raises(ModelNotFound) as refused:
        table.choose("m", None, NOBODY, ready, 0)
    assert "ops" not in str(refused.value)
    asked: list[int] = []

    def counted() -> str | None:
        asked.append(1)
        return None

    table.choose("open", None, counted, ready, 0)
    assert asked == []  # an open name never reads the caller's namespace


def test_mirrors_get_their_share_of_unpinned_requests() -> None:
    routes = [Route("v1", "m", "1"), Route("v2", "m", "2", traffic=0, mirror=50)]
    table = RoutingTable(routes)
    primary = table.route("v1")
    assert primary is not None
    draws = random.Random(3)
    copies = sum(len(table.mirrors("m", primary, NOBODY, draws.random)) for _ in range(4000))
    assert 1800 < copies < 2200
    assert table.has_mirrors("m") and not table.has_mirrors("other")
    # A mirror never mirrors itself when it answers (pinned, or by weight).
    assert table.mirrors("m", routes[1], NOBODY, lambda: 0.0) == []
