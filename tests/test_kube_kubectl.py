"""What a person sees: kubectl against the fake, with the CRDs' columns and validation."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from kubefake.fixtures import api_client, fake_api  # noqa: F401 (fixtures)
from kubefake.server import FakeApiServer
from kubernetes import client

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
EXAMPLES = Path(__file__).resolve().parent.parent / "daemonset" / "examples" / "cache.yaml"
ROLLOUT = EXAMPLES.with_name("rollout.yaml")
G, V = "nodecache.io", "v1alpha1"
Kubectl = Callable[..., str]


@pytest.fixture
def kubectl(fake_api: FakeApiServer, tmp_path: Path) -> Kubectl:  # noqa: F811
    config = fake_api.write_kubeconfig(tmp_path / "kubeconfig")

    def run(*args: str, stdin: str | None = None, ok: bool = True) -> str:
        done = subprocess.run(
            ["kubectl", f"--kubeconfig={config}", f"--cache-dir={tmp_path / 'cache'}", *args],
            input=stdin, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if ok:
            assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    return run


def table(out: str) -> list[dict[str, str]]:
    """kubectl's table as rows of column -> cell, cut where the headers start (an empty
    cell is blank, so splitting on spaces would shift the columns)."""
    header, *lines = out.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)}
            for line in lines]  # fmt: skip


def test_apply_get_scale_with_printer_columns(
    kubectl: Kubectl,
    api_client: client.ApiClient,  # noqa: F811
) -> None:
    out = kubectl("apply", "--validate=false", "-f", str(EXAMPLES))
    assert "localmodelcache.nodecache.io/resnet50 created" in out
    crs = client.CustomObjectsApi(api_client)
    ready = {"type": "Ready", "status": "True", "reason": "AllCopiesAvailable"}
    status = {"copies": {"available": 2, "total": 2, "failed": 0}, "warm": {"replicas": 1},
              "conditions": [ready], "serving": {"name": "resnet50"}}  # fmt: skip
    crs.patch_cluster_custom_object_status(G, V, "localmodelcaches", "resnet50", {"status": status})
    (row,) = table(kubectl("get", "lmc"))
    assert list(row) == ["NAME", "SERVED", "VERSION", "TRAFFIC", "READY", "COPIES", "WARM",
                         "SIZE", "AGE"]  # fmt: skip
    # No spec.serving: a real API server fills in version 1 and traffic 100 (the fake does
    # not default); the reconciler writes the served name.
    assert [row[c] for c in ("NAME", "SERVED", "READY", "COPIES", "WARM", "SIZE")] == [
        "resnet50", "resnet50", "True", "2", "1", "98Mi"]  # fmt: skip
    wide = kubectl("get", "localmodelcaches", "-o", "wide")
    assert "s3://models/resnet50/" in wide and "AllCopiesAvailable" in wide
    assert "fraud-scorer" in kubectl("get", "lmnc", "-n", "payments")
    assert "gpu-a100" in kubectl("get", "lmng")

    # Versions of one served name: their version and weight, -o wide their share and mirror.
    kubectl("apply", "--validate=false", "-f", str(ROLLOUT))
    for name, share in (("fraud-v1", 90), ("fraud-v2", 10), ("fraud-v3", 0)):
        serving = {"serving": {"name": "fraud", "share": share}}
        crs.patch_cluster_custom_object_status(G, V, "localmodelcaches", name, {"status": serving})
    rows = {r["NAME"]: r for r in table(kubectl("get", "lmc"))}
    v2 = rows["fraud-v2"]
    assert (v2["SERVED"], v2["VERSION"], v2["TRAFFIC"]) == ("fraud", "2", "10")
    (v3,) = table(kubectl("get", "lmc", "fraud-v3", "-o", "wide"))
    assert (v3["TRAFFIC"], v3["SHARE"], v3["MIRROR"]) == ("0", "0", "50")

    kubectl("scale", "lmc", "resnet50", "--replicas=3")
    cache = crs.get_cluster_custom_object(G, V, "localmodelcaches", "resnet50")
    assert cache["spec"]["warm"]["replicas"] == 3


def test_invalid_manifests_are_refused_with_the_rule_message(kubectl: Kubectl) -> None:
    bad = """apiVersion: nodecache.io/v1alpha1
kind: LocalModelCache
metadata: {name: bad}
spec:
  sourceModelUri: ftp://host/model
  modelSize: 1Gi
  nodeGroups: [gpu]
  warm: {minReplicas: 3, maxReplicas: 1}
"""
    out = kubectl("apply", "--validate=false", "-f", "-", stdin=bad, ok=False)
    assert "is invalid" in out
    assert "must not exceed" in out and "must be a file://" in out
    bad_version = bad.replace("ftp://", "s3://").replace("minReplicas: 3", "minReplicas: 1")
    bad_version += "  serving: {name: fraud, version: '..', mirror: 101}\n"
    out = kubectl("apply", "--validate=false", "-f", "-", stdin=bad_version, ok=False)
    assert "is invalid" in out and "greater than the maximum" in out
    fixed_mirror = bad_version.replace("mirror: 101", "mirror: 100")
    out = kubectl("apply", "--validate=false", "-f", "-", stdin=fixed_mirror, ok=False)
    assert "cannot be '.' or '..'" in out
