"""What a person sees: kubectl against the fake, with the CRDs' columns and validation."""

from __future__ import annotations

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


def test_apply_get_scale_with_printer_columns(
    kubectl: Kubectl,
    api_client: client.ApiClient,  # noqa: F811
) -> None:
    out = kubectl("apply", "--validate=false", "-f", str(EXAMPLES))
    assert "localmodelcache.nodecache.io/resnet50 created" in out
    crs = client.CustomObjectsApi(api_client)
    ready = {"type": "Ready", "status": "True", "reason": "AllCopiesAvailable"}
    status = {"copies": {"available": 2, "total": 2, "failed": 0}, "warm": {"replicas": 1},
              "conditions": [ready]}  # fmt: skip
    crs.patch_cluster_custom_object_status(G, V, "localmodelcaches", "resnet50", {"status": status})
    lines = kubectl("get", "lmc").splitlines()
    assert lines[0].split() == ["NAME", "READY", "COPIES", "WARM", "SIZE", "AGE"]
    assert lines[1].split()[:5] == ["resnet50", "True", "2", "1", "98Mi"]
    wide = kubectl("get", "localmodelcaches", "-o", "wide")
    assert "s3://models/resnet50/" in wide and "AllCopiesAvailable" in wide
    assert "fraud-scorer" in kubectl("get", "lmnc", "-n", "payments")
    assert "gpu-a100" in kubectl("get", "lmng")

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
