"""The fake API server's semantics, seen through the official kubernetes client."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kubefake.fixtures import api_client, fake_api  # noqa: F401 (fixtures)
from kubefake.server import FakeApiServer
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

G, V = "nodecache.io", "v1alpha1"


def cache(name: str = "m", **spec: Any) -> dict[str, Any]:
    base = {"sourceModelUri": "s3://b/m/", "modelSize": "1Gi", "nodeGroups": ["gpu"]}
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "LocalModelCache",
        "metadata": {"name": name},
        "spec": {**base, **spec},
    }


@pytest.fixture
def crs(api_client: client.ApiClient) -> client.CustomObjectsApi:  # noqa: F811
    return client.CustomObjectsApi(api_client)


def create(crs: client.CustomObjectsApi, obj: dict[str, Any]) -> dict[str, Any]:
    return crs.create_cluster_custom_object(G, V, "localmodelcaches", obj)


def get(crs: client.CustomObjectsApi, name: str = "m") -> dict[str, Any]:
    return crs.get_cluster_custom_object(G, V, "localmodelcaches", name)


def test_create_fills_metadata_and_refuses_duplicates(crs: client.CustomObjectsApi) -> None:
    made = create(crs, cache())
    meta = made["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0
    with pytest.raises(ApiException) as exc:
        create(crs, cache())
    assert exc.value.status == 409 and "AlreadyExists" in exc.value.body
    with pytest.raises(ApiException) as exc:
        get(crs, "absent")
    assert exc.value.status == 404


def test_resource_versions_come_from_one_counter(crs: client.CustomObjectsApi) -> None:
    a = create(crs, cache("a"))
    b = create(crs, cache("b"))
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])


def test_stale_update_is_a_conflict_and_generation_counts_spec_changes(
    crs: client.CustomObjectsApi,
) -> None:
    made = create(crs, cache())
    fresh = dict(made, spec={**made["spec"], "modelSize": "2Gi"})
    updated = crs.replace_cluster_custom_object(G, V, "localmodelcaches", "m", fresh)
    assert updated["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as exc:  # made's resourceVersion is stale now
        crs.replace_cluster_custom_object(G, V, "localmodelcaches", "m", made)
    assert exc.value.status == 409
    labelled = crs.patch_cluster_custom_object(
        G, V, "localmodelcaches", "m", {"metadata": {"labels": {"team": "a"}}}
    )
    assert labelled["metadata"]["generation"] == 2  # metadata is not spec
    assert labelled["metadata"]["resourceVersion"] != updated["metadata"]["resourceVersion"]


def test_status_and_spec_are_written_apart(crs: client.CustomObjectsApi) -> None:
    create(crs, cache())
    crs.patch_cluster_custom_object_status(
        G, V, "localmodelcaches", "m",
        {"spec": {"modelSize": "9Gi"}, "status": {"copies": {"available": 2}}},
    )  # fmt: skip
    obj = get(crs)
    assert obj["status"]["copies"]["available"] == 2
    assert obj["spec"]["modelSize"] == "1Gi" and obj["metadata"]["generation"] == 1
    crs.patch_cluster_custom_object(
        G, V, "localmodelcaches", "m", {"status": {"copies": {"available": 7}}}
    )
    assert get(crs)["status"]["copies"]["available"] == 2
    made = create(crs, {**cache("n"), "status": {"copies": {"available": 1}}})
    assert "status" not in made  # status is ignored on create


def test_json_patch_and_merge_patch(crs: client.CustomObjectsApi) -> None:
    create(crs, cache(warm={"minReplicas": 1, "maxReplicas": 3}))
    crs.patch_cluster_custom_object(
        G, V, "localmodelcaches", "m",
        [{"op": "replace", "path": "/spec/warm/maxReplicas", "value": 5},
         {"op": "add", "path": "/spec/nodeGroups/-", "value": "cpu"}],
        _content_type="application/json-patch+json",
    )  # fmt: skip
    crs.patch_cluster_custom_object(
        G, V, "localmodelcaches", "m", {"spec": {"warm": {"minReplicas": None}}}
    )
    spec = get(crs)["spec"]
    assert spec["warm"] == {"maxReplicas": 5} and spec["nodeGroups"] == ["gpu", "cpu"]


def test_schema_and_cel_rules_are_enforced(crs: client.CustomObjectsApi) -> None:
    with pytest.raises(ApiException) as exc:
        create(crs, cache(warm={"minReplicas": 4, "maxReplicas": 1}))
    assert exc.value.status == 422 and "must not exceed" in exc.value.body
    create(crs, {**cache(), "spec": {**cache()["spec"], "unknownField": 1}})
    assert "unknownField" not in get(crs)["spec"]  # pruned, as the apiserver does
    with pytest.raises(ApiException) as exc:
        crs.patch_cluster_custom_object(
            G, V, "localmodelcaches", "m", {"spec": {"sourceModelUri": "s3://b/other/"}}
        )
    assert exc.value.status == 422 and "immutable" in exc.value.body


def test_label_and_field_selectors(
    crs: client.CustomObjectsApi,
    api_client: client.ApiClient,  # noqa: F811
) -> None:
    for name, team in (("a", "x"), ("b", "y"), ("c", "x")):
        create(crs, {**cache(name), "metadata": {"name": name, "labels": {"team": team}}})

    def names(**kw: Any) -> list[str]:
        items = crs.list_cluster_custom_object(G, V, "localmodelcaches", **kw)["items"]
        return [o["metadata"]["name"] for o in items]

    assert names(label_selector="team=x") == ["a", "c"]
    assert names(label_selector="team in (y),team!=x") == ["b"]
    assert names(label_selector="!team") == []
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]
    with pytest.raises(ApiException) as exc:
        names(field_selector="spec.modelSize=1Gi")
    assert exc.value.status == 400
    core = client.CoreV1Api(api_client)
    for pod, node in (("p1", "n1"), ("p2", "n2")):
        core.create_namespaced_pod(
            "ns", {"metadata": {"name": pod}, "spec": {"nodeName": node, "containers": []}}
        )
    on_n1 = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1").items
    assert [p.metadata.name for p in on_n1] == ["p1"]


def test_list_pages_and_carries_a_resource_version(crs: client.CustomObjectsApi) -> None:
    for i in range(5):
        create(crs, cache(f"m{i}"))
    first = crs.list_cluster_custom_object(G, V, "localmodelcaches", limit=2)
    assert len(first["items"]) == 2 and first["metadata"]["continue"]
    seen = [o["metadata"]["name"] for o in first["items"]]
    token = first["metadata"]["continue"]
    while token:
        page = crs.list_cluster_custom_object(G, V, "localmodelcaches", limit=2, _continue=token)
        seen += [o["metadata"]["name"] for o in page["items"]]
        token = page["metadata"].get("continue")
    assert seen == [f"m{i}" for i in range(5)]
    assert int(first["metadata"]["resourceVersion"]) >= 5


def _events(crs: client.CustomObjectsApi, count: int, **kw: Any) -> list[tuple[str, Any]]:
    w, out = watch.Watch(), []
    for event in w.stream(crs.list_cluster_custom_object, G, V, "localmodelcaches", **kw):
        out.append((event["type"], event["object"]))
        if len(out) == count:
            w.stop()
    return out


def test_watch_resumes_from_a_resource_version(crs: client.CustomObjectsApi) -> None:
    start = create(crs, cache("a"))["metadata"]["resourceVersion"]
    create(crs, cache("b"))
    crs.patch_cluster_custom_object(G, V, "localmodelcaches", "b", {"spec": {"replicas": 1}})
    crs.delete_cluster_custom_object(G, V, "localmodelcaches", "a")
    events = _events(crs, 3, resource_version=start, timeout_seconds=5)
    assert [(t, o["metadata"]["name"]) for t, o in events] == [
        ("ADDED", "b"),
        ("MODIFIED", "b"),
        ("DELETED", "a"),
    ]


def test_watch_without_version_lists_first_then_follows(crs: client.CustomObjectsApi) -> None:
    create(crs, cache("a"))

    def later() -> None:
        create(crs, cache("b"))

    timer = threading.Timer(0.3, later)
    timer.start()
    events = _events(crs, 2, timeout_seconds=5)
    timer.join()
    assert [(t, o["metadata"]["name"]) for t, o in events] == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_sends_bookmarks_when_asked(crs: client.CustomObjectsApi) -> None:
    rv = create(crs, cache("a"))["metadata"]["resourceVersion"]
    w = watch.Watch()
    for event in w.stream(
        crs.list_cluster_custom_object, G, V, "localmodelcaches",
        resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=5,
    ):  # fmt: skip
        assert event["type"] == "BOOKMARK"
        assert event["object"]["metadata"]["resourceVersion"] == rv
        w.stop()
    assert w.resource_version == rv


def test_watch_from_a_compacted_version_is_gone(
    crs: client.CustomObjectsApi,
    fake_api: FakeApiServer,  # noqa: F811
) -> None:
    rv = create(crs, cache("a"))["metadata"]["resourceVersion"]
    create(crs, cache("b"))
    fake_api.compact()
    with pytest.raises(ApiException) as exc:
        _events(crs, 1, resource_version=rv, timeout_seconds=2)
    assert exc.value.status == 410


def test_finalizers_hold_deletion_until_removed(crs: client.CustomObjectsApi) -> None:
    rv = create(crs, {**cache(), "metadata": {"name": "m", "finalizers": ["nodecache.io/x"]}})[
        "metadata"
    ]["resourceVersion"]
    crs.delete_cluster_custom_object(G, V, "localmodelcaches", "m")
    held = get(crs)
    assert held["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiException) as exc:  # nothing new may hold it
        crs.patch_cluster_custom_object(
            G, V, "localmodelcaches", "m", {"metadata": {"finalizers": ["a", "b"]}}
        )
    assert exc.value.status == 422
    crs.patch_cluster_custom_object(
        G, V, "localmodelcaches", "m", {"metadata": {"finalizers": None}}
    )
    with pytest.raises(ApiException) as exc:
        get(crs)
    assert exc.value.status == 404
    events = _events(crs, 2, resource_version=rv, timeout_seconds=3)
    assert [t for t, _ in events] == ["MODIFIED", "DELETED"]


def test_scale_subresource_drives_warm_replicas(crs: client.CustomObjectsApi) -> None:
    create(crs, cache(warm={"minReplicas": 1, "maxReplicas": 5}))
    scale = crs.get_cluster_custom_object_scale(G, V, "localmodelcaches", "m")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 0
    crs.patch_cluster_custom_object_scale(G, V, "localmodelcaches", "m", {"spec": {"replicas": 3}})
    obj = get(crs)
    assert obj["spec"]["warm"]["replicas"] == 3 and obj["metadata"]["generation"] == 2
    crs.patch_cluster_custom_object_status(
        G, V, "localmodelcaches", "m", {"status": {"warm": {"replicas": 2, "selector": "a=b"}}}
    )
    scale = crs.get_cluster_custom_object_scale(G, V, "localmodelcaches", "m")
    assert scale["status"] == {"replicas": 2, "selector": "a=b"}


def test_leases_conflict_on_stale_writes(api_client: client.ApiClient) -> None:  # noqa: F811
    leases = client.CoordinationV1Api(api_client)
    body = client.V1Lease(
        metadata=client.V1ObjectMeta(name="l"), spec=client.V1LeaseSpec(holder_identity="a")
    )
    made = leases.create_namespaced_lease("ns", body)
    made.spec.holder_identity = "b"
    leases.replace_namespaced_lease("l", "ns", made)
    made.spec.holder_identity = "c"
    with pytest.raises(ApiException) as exc:
        leases.replace_namespaced_lease("l", "ns", made)
    assert exc.value.status == 409
    assert leases.read_namespaced_lease("l", "ns").spec.holder_identity == "b"


def test_state_survives_the_server_going_away(
    crs: client.CustomObjectsApi,
    fake_api: FakeApiServer,  # noqa: F811
) -> None:
    create(crs, cache())
    fake_api.stop()
    with pytest.raises(Exception):  # noqa: B017 - urllib3 raises its own connection errors
        crs.get_cluster_custom_object(G, V, "localmodelcaches", "m", _request_timeout=2)
    fake_api.start()
    assert get(crs)["metadata"]["name"] == "m"
