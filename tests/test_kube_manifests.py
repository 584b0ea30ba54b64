"""daemonset/: what `kubectl apply -k daemonset/` would install, checked like a cluster would."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from kubefake.schema import load_crds, prune, validate_object

from nodecache.agent.declarations import parse_declarations

ROOT = Path(__file__).resolve().parent.parent
DAEMONSET = ROOT / "daemonset"
KUBE_VERSION = "1.32"


def render() -> list[dict[str, Any]]:
    """`kubectl kustomize daemonset/`, or the listed resources when kubectl is absent."""
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", str(DAEMONSET)], capture_output=True, text=True, check=True
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    kustomization = yaml.safe_load((DAEMONSET / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DAEMONSET / resource).read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render()


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def test_everything_installs_is_valid_for_kubernetes(objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "DaemonSet", "Deployment", "ClusterRole"} <= kinds
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # the Prometheus Operator's CRD; not in the built-in schemas
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_podmonitor_scrapes_the_named_metrics_ports(objects: list[dict[str, Any]]) -> None:
    monitor = find(objects, "PodMonitor", "nodecache")
    selector = monitor["spec"]["selector"]["matchLabels"]
    for kind, name in (("DaemonSet", "nodecache-agent"), ("Deployment", "nodecache-reconciler")):
        pod = find(objects, kind, name)["spec"]["template"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_crds_have_short_names_columns_and_subresources(objects: list[dict[str, Any]]) -> None:
    crds = {
        o["spec"]["names"]["kind"]: o for o in objects if o["kind"] == "CustomResourceDefinition"
    }
    assert set(crds) == {
        "LocalModelCache",
        "LocalModelNamespaceCache",
        "LocalModelNodeGroup",
        "LocalModelNode",
    }
    for kind in ("LocalModelCache", "LocalModelNamespaceCache"):
        version = crds[kind]["spec"]["versions"][0]
        columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
        assert {"READY", "COPIES", "WARM", "SIZE", "AGE"} <= set(columns)
        assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.warm.replicas"
        assert "status" in version["subresources"]
    assert crds["LocalModelNamespaceCache"]["spec"]["scope"] == "Namespaced"
    shorts = {k: c["spec"]["names"]["shortNames"] for k, c in crds.items()}
    assert shorts == {
        "LocalModelCache": ["lmc"],
        "LocalModelNamespaceCache": ["lmnc"],
        "LocalModelNodeGroup": ["lmng"],
        "LocalModelNode": ["lmn"],
    }
    for crd in crds.values():
        _assert_structural(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")


def _assert_structural(schema: dict[str, Any], where: str) -> None:
    """Every node says its type (or is int-or-string), as the apiserver requires."""
    assert "type" in schema or schema.get("x-kubernetes-int-or-string"), where
    for rule in schema.get("x-kubernetes-validations", []):
        celpy.Environment().compile(rule["rule"])  # every rule compiles
    for key, sub in (schema.get("properties") or {}).items():
        _assert_structural(sub, f"{where}.{key}")
    if isinstance(schema.get("additionalProperties"), dict):
        _assert_structural(schema["additionalProperties"], f"{where}.*")
    if "items" in schema:
        _assert_structural(schema["items"], f"{where}[]")


def test_namespace_cache_spec_is_the_cache_spec_without_allowed_namespaces() -> None:
    crds = load_crds()
    cluster = copy.deepcopy(crds["localmodelcaches"].schema)
    del cluster["properties"]["spec"]["properties"]["allowedNamespaces"]
    assert crds["localmodelnamespacecaches"].schema == cluster


def test_examples_are_valid_and_parse_like_standalone_declarations() -> None:
    crds = {c.kind: c for c in load_crds().values()}
    text = (DAEMONSET / "examples" / "cache.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        schema = crds[doc["kind"]].schema
        assert prune(schema, doc) == doc, "example has fields the CRD would drop"
        assert validate_object(schema, doc) == []
    caches = [d for d in docs if d["kind"] == "LocalModelCache"]
    (parsed,) = parse_declarations(yaml.safe_dump_all(caches))
    assert parsed.warm.max_replicas == 4


# -- CEL rules, evaluated like the apiserver: self bound to the field, oldSelf on updates --


def cache(**spec: Any) -> dict[str, Any]:
    base = {"sourceModelUri": "s3://bucket/model/", "modelSize": "1Gi", "nodeGroups": ["gpu"]}
    return {
        "apiVersion": "nodecache.io/v1alpha1",
        "kind": "LocalModelCache",
        "metadata": {"name": "m"},
        "spec": {**base, **spec},
    }


GOOD = [
    cache(),
    cache(sourceModelUri="gs://b/m"),
    cache(sourceModelUri="https://example.com/m.onnx"),
    cache(sourceModelUri="http://example.com/m.onnx"),
    cache(sourceModelUri="file:///models/m"),
    cache(modelSize=1),
    cache(modelSize="0.5Gi"),
    cache(modelSize="1e3"),
    cache(warm={"minReplicas": 2, "maxReplicas": 2}),
    cache(warm={"minReplicas": 1}),
    cache(format="onnx", runtime="onnx"),
    cache(runtime="python", entrypoint="pkg.mod:Model"),
    cache(format="torch", runtime="python", entrypoint="pkg.mod:Net"),
    cache(batching={"maxBatchSize": 8, "maxQueueDelay": "2ms"}),
]

BAD = [
    (cache(sourceModelUri="ftp://host/m"), "must be a file://"),
    (cache(sourceModelUri="s3:/bucket"), "must be a file://"),
    (cache(sourceModelUri="hdfs://nn/m"), "must be a file://"),
    (cache(modelSize="0"), "modelSize must be positive"),
    (cache(modelSize="0Gi"), "modelSize must be positive"),
    (cache(modelSize=0), "modelSize must be positive"),
    (cache(modelSize="-1Gi"), "does not match"),
    (cache(modelSize="lots"), "does not match"),
    (cache(nodeGroups=[]), "should be non-empty"),
    (cache(warm={"minReplicas": 3, "maxReplicas": 1}), "must not exceed"),
    (cache(warm={"minReplicas": -1}), "less than the minimum"),
    (cache(warm={"idleTimeout": "ten minutes"}), "does not match"),
    (cache(format="onnx", runtime="torch"), "disagree"),
    (cache(format="tensorflow"), "is not one of"),
    (cache(replicas=-1), "less than the minimum"),
    (cache(allowedNamespaces=["Bad_NS"]), "does not match"),
]


@pytest.mark.parametrize("obj", GOOD, ids=lambda o: str(o["spec"]))
def test_valid_caches_pass_schema_and_cel(obj: dict[str, Any]) -> None:
    assert validate_object(load_crds()["localmodelcaches"].schema, obj) == []


@pytest.mark.parametrize(("obj", "message"), BAD, ids=[m for _, m in BAD])
def test_invalid_caches_are_rejected_with_a_reason(obj: dict[str, Any], message: str) -> None:
    problems = validate_object(load_crds()["localmodelcaches"].schema, obj)
    assert any(message in p for p in problems), problems


def test_source_uri_is_immutable_but_the_rest_may_change() -> None:
    schema = load_crds()["localmodelcaches"].schema
    old = cache()
    moved = cache(sourceModelUri="s3://bucket/other/")
    assert any("immutable" in p for p in validate_object(schema, moved, old))
    assert validate_object(schema, moved) == []  # creating it is fine
    assert validate_object(schema, cache(modelSize="2Gi", nodeGroups=["a", "b"]), old) == []


def test_node_group_storage_limit_must_be_positive() -> None:
    schema = load_crds()["localmodelnodegroups"].schema

    def group(limit: Any) -> dict[str, Any]:
        return {"spec": {"nodeSelector": {"pool": "gpu"}, "storageLimit": limit}}

    assert validate_object(schema, group("500Gi")) == []
    assert any("positive" in p for p in validate_object(schema, group("0")))
    assert validate_object(schema, {"spec": {}}) != []  # storageLimit is required


# -- the DaemonSet and RBAC --


def test_one_host_path_decides_the_node_path(objects: list[dict[str, Any]]) -> None:
    pod = find(objects, "DaemonSet", "nodecache-agent")["spec"]["template"]["spec"]
    host_paths = [v for v in pod["volumes"] if "hostPath" in v]
    assert len(host_paths) == 1, "cache and socket must share one hostPath"
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == host_paths[0]["name"]]
    args = dict(a.split("=", 1) for a in container["args"] if a.startswith("--"))
    for flag in ("--cache-dir", "--socket-dir"):
        assert args[flag].startswith(mount["mountPath"] + "/"), flag
    rendered = yaml.safe_dump_all(objects)
    assert rendered.count(host_paths[0]["hostPath"]["path"]) == 1, "node path written once"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["hostPID"] is True
    assert {"nvidia.com/gpu"} <= {t["key"] for t in pod["tolerations"]}
    assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert container["readinessProbe"]["exec"]["command"][:2] == ["nodecache", "status"]
    assert container["resources"]["requests"]


def _rules(objects: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return find(objects, "ClusterRole", name)["rules"]


WRITE = {"create", "update", "patch", "delete", "deletecollection", "*"}


def test_agent_may_write_only_localmodelnode_status_and_events(
    objects: list[dict[str, Any]],
) -> None:
    writes = {
        (group, resource)
        for rule in _rules(objects, "nodecache-agent")
        if WRITE & set(rule["verbs"])
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert writes == {
        ("nodecache.io", "localmodelnodes/status"),
        ("", "events"),
        ("events.k8s.io", "events"),
    }
    status_rule = next(
        r for r in _rules(objects, "nodecache-agent") if "localmodelnodes/status" in r["resources"]
    )
    assert status_rule["verbs"] == ["patch"]
    for rule in _rules(objects, "nodecache-agent") + _rules(objects, "nodecache-reconciler"):
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert "secrets" not in rule["resources"]


def test_reconciler_has_its_own_account_and_a_lease(objects: list[dict[str, Any]]) -> None:
    deployment = find(objects, "Deployment", "nodecache-reconciler")
    daemonset = find(objects, "DaemonSet", "nodecache-agent")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] != daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    assert deployment["spec"]["replicas"] == 2
    assert "--lease-name=nodecache-reconciler" in pod["containers"][0]["args"]
    lease_rules = find(objects, "Role", "nodecache-reconciler-leader")["rules"]
    assert {r["apiGroups"][0] for r in lease_rules} == {"coordination.k8s.io"}
    assert any(r.get("resourceNames") == ["nodecache-reconciler"] for r in lease_rules)


# -- the CRD and the standalone parser accept the same specs --

PARITY = [
    {},
    {"format": "onnx"},
    {"format": "onnx", "runtime": "onnx"},
    {"format": "onnx", "runtime": "torch"},
    {"format": "torch", "runtime": "python", "entrypoint": "pkg.mod:Model"},
    {"format": "python", "entrypoint": "pkg.mod:Model"},
    {"format": "python", "runtime": "python", "entrypoint": "pkg.mod:Model"},
    {"runtime": "python", "entrypoint": "pkg.mod:Model"},
    {"runtime": "python"},
    {"entrypoint": "pkg.mod:Model"},
    {"runtime": "onnx", "entrypoint": "pkg.mod:Model"},
    {"entrypoint": "not an entrypoint", "runtime": "python"},
    {"batching": {"maxBatchSize": 16, "maxQueueDelay": "500us"}},
    {"batching": {"maxBatchSize": 16}},
    {"batching": {"maxBatchSize": 0}},
    {"batching": {"maxQueueDelay": "1ms"}},
    {"batching": {"maxBatchSize": 4, "maxQueueDelay": "soon"}},
    {"warm": {"idleTimeout": "1h30m"}},
    {"warm": {"idleTimeout": "90"}},
    {"warm": {"minReplicas": 2, "maxReplicas": 1}},
    {"warm": {"pinned": True, "minReplicas": 1}},
    {"replicas": 0},
    {"replicas": -1},
    {"modelSize": "0"},
    {"modelSize": "2Gi"},
    {"nodeGroups": []},
    {"sourceModelUri": "ftp://host/m/"},
]


@pytest.mark.parametrize("spec", PARITY, ids=[str(s) for s in PARITY])
def test_crd_and_standalone_parser_agree(spec: dict[str, Any]) -> None:
    """A manifest that works standalone works in a cluster, and the other way round."""
    from nodecache.agent.declarations import DeclarationError, parse_object

    obj = cache(**spec)
    crd_ok = validate_object(load_crds()["localmodelcaches"].schema, obj) == []
    try:
        parse_object(obj)
        parser_ok = True
    except DeclarationError:
        parser_ok = False
    assert crd_ok == parser_ok, (crd_ok, parser_ok)


def test_container_args_are_ones_the_cli_accepts(objects: list[dict[str, Any]]) -> None:
    """The manifests and `nodecache` cannot drift apart unnoticed: a command or flag in a
    manifest that the CLI does not know fails here."""
    from nodecache.agent.cli import build_parser
    from nodecache.agent.settings import COMMANDS, flags

    for kind, name in (("DaemonSet", "nodecache-agent"), ("Deployment", "nodecache-reconciler")):
        (container,) = find(objects, kind, name)["spec"]["template"]["spec"]["containers"]
        args = [a.replace("$(POD_NAMESPACE)", "ns").replace("$(POD_NAME)", "p")
                for a in container["args"]]  # fmt: skip
        assert args[0] in COMMANDS, f"{kind} {name} runs `nodecache {args[0]}`: no such command"
        given = {a.split("=", 1)[0] for a in args[1:] if a.startswith("--")}
        assert given <= set(flags(COMMANDS[args[0]])), f"{kind} {name}: unknown flags"
        build_parser().parse_args(args)  # and their values parse (SystemExit if not)


def test_admission_policy_keeps_an_agent_to_its_own_node(objects: list[dict[str, Any]]) -> None:
    policy = find(objects, "ValidatingAdmissionPolicy", "nodecache-agent-own-node")["spec"]
    env = celpy.Environment()

    def admitted(user: str, node_name: str | None, target: str) -> bool:
        extra = {"authentication.kubernetes.io/node-name": [node_name]} if node_name else {}
        activation = {
            "request": celpy.json_to_cel({"userInfo": {"username": user, "extra": extra}}),
            "object": celpy.json_to_cel({"metadata": {"name": target}}),
        }
        for condition in policy["matchConditions"]:
            if not env.program(env.compile(condition["expression"])).evaluate(activation):
                return True  # the policy does not apply to this caller
        return all(
            bool(env.program(env.compile(v["expression"])).evaluate(activation))
            for v in policy["validations"]
        )

    agent = "system:serviceaccount:nodecache-system:nodecache-agent"
    assert admitted(agent, "n1", "n1")
    assert not admitted(agent, "n1", "n2")
    assert not admitted(agent, None, "n1")  # a token not bound to a node
    assert admitted("system:serviceaccount:nodecache-system:nodecache-reconciler", None, "n2")
