"""daemonset/: what `kubectl apply -k daemonset/` would install, checked like a cluster would."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tomllib
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
EXAMPLES = DAEMONSET / "examples"
KUBE_VERSION = "1.32"
DRIVER = "csi.nodecache.io"
KUBELET = "/var/lib/kubelet"
Obj = dict[str, Any]


def kustomize(root: Path) -> list[Obj]:
    """`kubectl kustomize ROOT`, or :func:`build` when kubectl is absent."""
    if not shutil.which("kubectl"):
        return build(root)
    out = subprocess.run(
        ["kubectl", "kustomize", str(root)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def build(root: Path) -> list[Obj]:
    """The part of kustomize these manifests use (resources, components, a ConfigMap from
    files, images), for machines without kubectl; checked against kubectl where it exists."""
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    docs: list[Obj] = []
    for entry in spec.get("resources", []) + spec.get("components", []):
        path = root / entry
        docs += (
            build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
        )
    for gen in spec.get("configMapGenerator", []):
        meta = {"name": gen["name"], "namespace": gen["namespace"]}
        meta["labels"] = gen.get("options", {}).get("labels", {})
        data = {Path(f).name: (root / f).read_text() for f in gen["files"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in spec.get("images", [])}
    for doc in docs:
        for c in containers(pod_spec(doc)):
            c["image"] = images.get(c["image"], c["image"])
    return docs


def with_monitoring(tmp: Path) -> list[Obj]:
    """What a user gets who adds the component with one line in their own kustomization."""
    base = os.path.relpath(DAEMONSET, tmp)
    (tmp / "kustomization.yaml").write_text(
        f"resources: [{base}]\ncomponents: [{base}/components/monitoring]\n"
    )
    return kustomize(tmp)


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return kustomize(DAEMONSET)


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def pod_spec(obj: Obj) -> Obj:
    """The pod spec of a Pod or of a workload's template; empty for anything else."""
    if obj["kind"] == "Pod":
        return obj["spec"]
    return obj.get("spec", {}).get("template", {}).get("spec", {})


def containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def container(objects: list[Obj], kind: str, name: str, main: str) -> Obj:
    """Container ``main`` of workload ``kind``/``name``."""
    return next(c for c in pod_spec(find(objects, kind, name))["containers"] if c["name"] == main)


def test_base_installs_on_a_bare_cluster(objects: list[Obj]) -> None:
    """Only built-in kinds and our own CRDs: no Prometheus Operator, no Grafana needed."""
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "DaemonSet", "Deployment", "ClusterRole"} <= kinds
    assert "CSIDriver" in kinds
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)  # unknown kinds fail
    assert "PodMonitor" not in kinds
    assert not [o for o in objects if "grafana_dashboard" in o["metadata"].get("labels", {})]
    pod = pod_spec(find(objects, "DaemonSet", "nodecache-agent"))
    assert {c["name"] for c in pod["containers"]} == {"agent", "node-driver-registrar"}


def test_monitoring_component_adds_podmonitor_and_dashboard(
    objects: list[Obj], tmp_path: Path
) -> None:
    monitored = with_monitoring(tmp_path)
    added = [o for o in monitored if o not in objects]
    assert sorted(o["kind"] for o in added) == ["ConfigMap", "PodMonitor"]
    monitor = find(added, "PodMonitor", "nodecache")
    selector = monitor["spec"]["selector"]["matchLabels"]
    for kind, name, main in (
        ("DaemonSet", "nodecache-agent", "agent"),
        ("Deployment", "nodecache-reconciler", "reconciler"),
    ):
        pod = find(objects, kind, name)["spec"]["template"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        ports = {p["name"] for p in container(objects, kind, name, main)["ports"]}
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    dashboard = find(added, "ConfigMap", "nodecache-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "nodecache-system"
    kubernetes_validate.validate(dashboard, KUBE_VERSION, strict=True)
    assert "nodecache_requests_total" in dashboard["data"]["nodecache-dashboard.json"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_fallback_renders_what_kubectl_renders(tmp_path: Path) -> None:
    def summary(docs: list[Obj]) -> list[tuple[str, str, list[str]]]:
        return sorted(
            (d["kind"], d["metadata"]["name"], [c["image"] for c in containers(pod_spec(d))])
            for d in docs
        )

    assert summary(build(DAEMONSET)) == summary(kustomize(DAEMONSET))
    monitored = with_monitoring(tmp_path)
    assert summary(build(tmp_path)) == summary(monitored)


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
        assert {"SERVED", "VERSION", "TRAFFIC", "READY", "COPIES", "WARM", "SIZE", "AGE"} <= set(
            columns
        )
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
        version = crd["spec"]["versions"][0]
        _assert_structural(version["schema"]["openAPIV3Schema"], "")
        for column in version["additionalPrinterColumns"]:
            if column["jsonPath"].startswith(".metadata."):  # the apiserver's, not our schema
                continue
            field = _schema_at(version["schema"]["openAPIV3Schema"], column["jsonPath"])
            # kubectl prints any value in a string column; other types must match.
            json_type = "string" if column["type"] == "date" else column["type"]
            assert column["type"] == "string" or field.get("type") == json_type, (
                crd["spec"]["names"]["kind"],
                column["name"],
                field,
            )


def _schema_at(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    """The schema node a printer column's JSONPath reads (filters step into list items):
    a column that names no field of the schema shows nothing, silently."""
    for part in re.sub(r"\[[^]]*\]", ".[]", json_path).strip(".").split("."):
        if part == "[]":
            schema = schema["items"]
        elif part:
            props = schema.get("properties") or {}
            schema = props[part] if part in props else schema["additionalProperties"]
    return schema


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


def test_serving_defaults_are_the_parsers_and_valid() -> None:
    """What the API server fills in for an absent spec.serving is what the standalone
    parser assumes, and passes the schema's own rules (the API server checks that too)."""
    from nodecache.agent.declarations import Serving, parse_object

    for plural in ("localmodelcaches", "localmodelnamespacecaches"):
        schema = load_crds()[plural].schema["properties"]["spec"]["properties"]["serving"]
        assert schema["default"] == {}
        defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
        assert defaults == {"version": "1", "traffic": 100, "mirror": 0}
        filled = cache(serving=defaults)
        assert validate_object(load_crds()["localmodelcaches"].schema, filled) == []
        assert parse_object(filled).serving == parse_object(cache()).serving == Serving("m")


def test_namespace_cache_spec_is_the_cache_spec_without_allowed_namespaces() -> None:
    crds = load_crds()
    cluster = copy.deepcopy(crds["localmodelcaches"].schema)
    del cluster["properties"]["spec"]["properties"]["allowedNamespaces"]
    assert crds["localmodelnamespacecaches"].schema == cluster


def test_examples_are_valid_and_parse_like_standalone_declarations() -> None:
    crds = {c.kind: c for c in load_crds().values()}
    text = (EXAMPLES / "cache.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        schema = crds[doc["kind"]].schema
        assert prune(schema, doc) == doc, "example has fields the CRD would drop"
        assert validate_object(schema, doc) == []
    caches = [d for d in docs if d["kind"] == "LocalModelCache"]
    (parsed,) = parse_declarations(yaml.safe_dump_all(caches))
    assert parsed.warm.max_replicas == 4


def test_rollout_example_is_three_versions_of_one_name() -> None:
    """docs/ROLLOUTS.md's manifests: valid, parsed alike standalone, none refused."""
    from nodecache.agent.declarations import refuse_duplicate_versions

    crds = {c.kind: c for c in load_crds().values()}
    text = (EXAMPLES / "rollout.yaml").read_text()
    for doc in (d for d in yaml.safe_load_all(text) if d):
        assert prune(crds[doc["kind"]].schema, doc) == doc
        assert validate_object(crds[doc["kind"]].schema, doc) == []
    parsed = parse_declarations(text)
    kept, refused = refuse_duplicate_versions({d.key: d for d in parsed})
    assert refused == {} and len(kept) == 3
    served = sorted((d.serving.name, d.serving.version, d.serving.traffic, d.serving.mirror)
                    for d in parsed)  # fmt: skip
    assert served == [("fraud", "1", 90, 0), ("fraud", "2", 10, 0), ("fraud", "3", 0, 50)]


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
    cache(sourceModelUri="oci://registry.example.com/models/fraud:v2"),
    cache(sourceModelUri="hf://meta-llama/Llama-3.1-8B@main"),
    cache(sourceModelUri="az://models/fraud/v2/"),
    cache(sourceModelUri="abfss://models@acct.dfs.core.windows.net/fraud/"),
    cache(sourceModelUri="models:/fraud@champion"),
    cache(modelSize=1),
    cache(modelSize="0.5Gi"),
    cache(modelSize="1e3"),
    cache(warm={"minReplicas": 2, "maxReplicas": 2}),
    cache(warm={"minReplicas": 1}),
    cache(format="onnx", runtime="onnx"),
    cache(runtime="python", entrypoint="pkg.mod:Model"),
    cache(format="torch", runtime="python", entrypoint="pkg.mod:Net"),
    cache(batching={"maxBatchSize": 8, "maxQueueDelay": "2ms"}),
    cache(serving={}),
    cache(serving={"name": "fraud", "version": "2", "traffic": 10, "mirror": 0}),
    cache(serving={"name": "fraud.eu-west", "version": "v2.1-rc_1"}),
    cache(serving={"version": "x" * 64, "traffic": 0, "mirror": 100}),
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
    (cache(serving={"name": "Fraud"}), "does not match"),
    (cache(serving={"name": "fraud_v2"}), "does not match"),
    (cache(serving={"name": "a" * 254}), "is too long"),
    (cache(serving={"version": 2}), "is not of type 'string'"),
    (cache(serving={"version": "2/infer"}), "does not match"),
    (cache(serving={"version": "x" * 65}), "is too long"),
    (cache(serving={"version": ".."}), "cannot be '.' or '..'"),
    (cache(serving={"version": "."}), "cannot be '.' or '..'"),
    (cache(serving={"traffic": -1}), "less than the minimum"),
    (cache(serving={"mirror": 101}), "greater than the maximum"),
    (cache(serving={"mirror": -5}), "less than the minimum"),
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
    host_paths = [
        v
        for v in pod["volumes"]
        if "hostPath" in v and not v["hostPath"]["path"].startswith(KUBELET)
    ]
    assert len(host_paths) == 1, "cache and socket must share one hostPath (besides kubelet's)"
    agent = container(objects, "DaemonSet", "nodecache-agent", "agent")
    (mount,) = [m for m in agent["volumeMounts"] if m["name"] == host_paths[0]["name"]]
    args = dict(a.split("=", 1) for a in agent["args"] if a.startswith("--"))
    for flag in ("--cache-dir", "--socket-dir"):
        assert args[flag].startswith(mount["mountPath"] + "/"), flag
    rendered = yaml.safe_dump_all(objects)
    assert rendered.count(host_paths[0]["hostPath"]["path"]) == 1, "node path written once"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["hostPID"] is True
    assert {"nvidia.com/gpu"} <= {t["key"] for t in pod["tolerations"]}
    assert agent["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert agent["readinessProbe"]["exec"]["command"][:2] == ["nodecache", "status"]
    assert agent["resources"]["requests"]


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


# -- pods on the node: the CSI driver, its registration, the image --


def test_csi_driver_is_node_only_ephemeral_with_pod_info(objects: list[Obj]) -> None:
    spec = find(objects, "CSIDriver", DRIVER)["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True  # the pod's namespace decides what it may mount
    assert spec["volumeLifecycleModes"] == ["Ephemeral"]
    assert spec["fsGroupPolicy"] == "None"  # kubelet must never chown the node's cache


def _mounts(c: Obj, volumes: dict[str, Obj]) -> dict[str, tuple[str, Obj]]:
    """host path -> (path in the container, the mount), for the container's hostPath mounts."""
    return {
        volumes[m["name"]]["hostPath"]["path"]: (m["mountPath"], m)
        for m in c.get("volumeMounts", [])
        if "hostPath" in volumes[m["name"]]
    }


def test_agent_serves_the_driver_where_kubelet_finds_it(objects: list[Obj]) -> None:
    """The agent's CSI socket, the registrar's view of it and the path kubelet is told are the
    same file on the node; the agent's mounts under the pods folder reach the node."""
    pod = pod_spec(find(objects, "DaemonSet", "nodecache-agent"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    agent = container(objects, "DaemonSet", "nodecache-agent", "agent")
    registrar = container(objects, "DaemonSet", "nodecache-agent", "node-driver-registrar")
    plugin = f"{KUBELET}/plugins/{DRIVER}"

    agent_mounts, registrar_mounts = _mounts(agent, volumes), _mounts(registrar, volumes)
    endpoint = agent_mounts[plugin][0] + "/csi.sock"
    assert f"--csi-endpoint=unix://{endpoint}" in agent["args"]
    assert f"--csi-address={registrar_mounts[plugin][0]}/csi.sock" in registrar["args"]
    assert f"--kubelet-registration-path={plugin}/csi.sock" in registrar["args"]
    assert registrar_mounts[f"{KUBELET}/plugins_registry"][0] == "/registration"
    assert re.fullmatch(
        r"registry\.k8s\.io/sig-storage/csi-node-driver-registrar:v\d+\.\d+\.\d+",
        registrar["image"],
    ), "the registrar is pinned to a release"
    probe = registrar["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in registrar["ports"]}[probe["port"]] == 9809
    assert "--http-endpoint=:9809" in registrar["args"]

    # kubelet names target paths by their node path: the same path inside, propagated back.
    inside, mount = agent_mounts[f"{KUBELET}/pods"]
    assert inside == f"{KUBELET}/pods"
    assert mount["mountPropagation"] == "Bidirectional"
    assert agent["securityContext"]["privileged"] is True
    assert agent["securityContext"]["runAsUser"] == 0  # mount(2), whatever the image's USER
    assert not registrar["securityContext"].get("privileged")
    assert "mountPropagation" not in str(registrar.get("volumeMounts"))


def test_containers_pass_the_api_servers_security_rules(objects: list[Obj]) -> None:
    """Rules the API server enforces that a schema cannot express."""
    for obj in objects + examples():
        for c in containers(pod_spec(obj)):
            ctx = c.get("securityContext", {})
            where = f"{obj['kind']} {obj['metadata']['name']} {c['name']}"
            if ctx.get("privileged"):
                # "cannot set allowPrivilegeEscalation to false and privileged to true"
                assert ctx.get("allowPrivilegeEscalation") is not False, where
            for mount in c.get("volumeMounts", []):
                if mount.get("mountPropagation") == "Bidirectional":
                    assert ctx.get("privileged") is True, where


def test_image_is_named_once_and_is_the_package_version(objects: list[Obj]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    spec = yaml.safe_load((DAEMONSET / "kustomization.yaml").read_text())
    (image,) = [i for i in spec["images"] if i["name"] == "nodecache"]
    assert (image["newName"], image["newTag"]) == ("ghcr.io/nodecache/nodecache", version)
    installed = [p for p in DAEMONSET.rglob("*.yaml") if EXAMPLES not in p.parents]
    for path in installed:
        assert (
            "ghcr.io/nodecache" not in path.read_text() or path == DAEMONSET / "kustomization.yaml"
        )
    ours = [
        c["image"]
        for o in objects
        for c in containers(pod_spec(o))
        if "csi-node-driver-registrar" not in c["image"]
    ]
    assert ours and set(ours) == {f"ghcr.io/nodecache/nodecache:{version}"}


# -- examples: workload pods need no hostPath and no privilege --


def examples() -> list[Obj]:
    return [
        d for p in sorted(EXAMPLES.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d
    ]


def built_in(obj: Obj) -> bool:
    """A Kubernetes kind (core, apps, batch, policy, *.k8s.io), not a custom resource."""
    group = obj["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def restricted_problems(pod: Obj) -> list[str]:
    """What Pod Security "restricted" (which includes "baseline") refuses in a pod spec, field
    by field as the admission plugin checks them."""
    problems = [f"{f}: true" for f in ("hostNetwork", "hostPID", "hostIPC") if pod.get(f)]
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
               "persistentVolumeClaim", "projected", "secret"}  # fmt: skip
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        problems += [f"volume {volume['name']}: {k}" for k in sorted(kinds - allowed)]
    pod_ctx = pod.get("securityContext", {})
    for c in containers(pod):
        ctx = {**pod_ctx, **c.get("securityContext", {})}
        caps = c.get("securityContext", {}).get("capabilities", {})
        checks = {
            "privileged": not ctx.get("privileged"),
            "allowPrivilegeEscalation: false": ctx.get("allowPrivilegeEscalation") is False,
            "runAsNonRoot: true": ctx.get("runAsNonRoot") is True,
            "runAsUser not 0": ctx.get("runAsUser") != 0,
            "seccompProfile RuntimeDefault or Localhost": ctx.get("seccompProfile", {}).get("type")
            in ("RuntimeDefault", "Localhost"),
            "capabilities drop ALL": "ALL" in caps.get("drop", []),
            "capabilities add only NET_BIND_SERVICE": set(caps.get("add", []))
            <= {"NET_BIND_SERVICE"},
            "no hostPort": not any(p.get("hostPort") for p in c.get("ports", [])),
        }
        problems += [f"{c['name']}: {rule}" for rule, ok in checks.items() if not ok]
    return problems


def test_restricted_check_refuses_the_agent(objects: list[Obj]) -> None:
    problems = restricted_problems(pod_spec(find(objects, "DaemonSet", "nodecache-agent")))
    assert "hostPID: true" in problems
    assert "agent: privileged" in problems
    assert any("hostPath" in p for p in problems)


def test_example_workloads_are_valid_and_use_no_host_path() -> None:
    docs = examples()
    assert "hostPath" not in yaml.safe_dump_all(docs)
    workloads = [d for d in docs if pod_spec(d)]
    assert {d["metadata"]["name"] for d in workloads} >= {"resnet50-files", "resnet50-client"}
    for doc in docs:
        if built_in(doc):
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_example_pods_run_in_a_restricted_namespace(objects: list[Obj]) -> None:
    """Both examples reach the node through the driver, as a restricted namespace's pods
    must: the model folder and the socket, readable through the agent's group."""
    docs = examples()
    namespace = find(docs, "Namespace", "vision")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    agent_group = container(objects, "DaemonSet", "nodecache-agent", "agent")["securityContext"]
    caches = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "LocalModelCache"}
    attributes = []
    for name in ("resnet50-files", "resnet50-client"):
        pod = find(docs, "Pod", name)
        assert pod["metadata"]["namespace"] == "vision"
        assert restricted_problems(pod["spec"]) == [], name
        assert agent_group["runAsGroup"] in pod["spec"]["securityContext"]["supplementalGroups"]
        (volume,) = [v for v in pod["spec"]["volumes"] if "csi" in v]
        assert volume["csi"]["driver"] == DRIVER
        attributes.append(volume["csi"]["volumeAttributes"])
        if "model" in volume["csi"]["volumeAttributes"]:
            cache = caches[volume["csi"]["volumeAttributes"]["model"]]
            assert "vision" in cache.get("allowedNamespaces", ["vision"])
    assert attributes == [{"model": "resnet50"}, {"socket": "true"}]


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
    {"serving": {}},
    {"serving": {"name": "fraud", "version": "2", "traffic": 10, "mirror": 0}},
    {"serving": {"version": "v2.1-rc_1", "traffic": 0, "mirror": 100}},
    {"serving": {"name": "Fraud"}},
    {"serving": {"name": ""}},
    {"serving": {"version": 2}},
    {"serving": {"version": ""}},
    {"serving": {"version": "2/infer"}},
    {"serving": {"version": "x" * 65}},
    {"serving": {"traffic": -1}},
    {"serving": {"mirror": 101}},
    {"serving": "fraud"},
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

    for kind, name, main in (
        ("DaemonSet", "nodecache-agent", "agent"),
        ("Deployment", "nodecache-reconciler", "reconciler"),
    ):
        args = [a.replace("$(POD_NAMESPACE)", "ns").replace("$(POD_NAME)", "p")
                for a in container(objects, kind, name, main)["args"]]  # fmt: skip
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
