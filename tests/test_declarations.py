"""Declarations: what a KServe user writes works; what is wrong is refused by field."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from nodecache.agent.declarations import (
    DeclarationError,
    ModelDeclaration,
    Serving,
    parse_declarations,
    parse_object,
    refuse_duplicate_versions,
)
from nodecache.agent.files import DeclarationFolder
from nodecache.agent.standalone import _one_per_version

KSERVE_STYLE = """\
apiVersion: nodecache.io/v1alpha1
kind: LocalModelCache
metadata:
  name: llama-mini
spec:
  sourceModelUri: gs://models/llama-mini
  modelSize: 1.5Gi
  nodeGroups: [gpu-a100]
"""


def test_kserve_fields_alone_are_enough() -> None:
    (decl,) = parse_declarations(KSERVE_STYLE)
    assert decl.name == "llama-mini"
    assert decl.source_uri == "gs://models/llama-mini"
    assert decl.model_size == int(1.5 * 2**30)
    assert decl.node_groups == ("gpu-a100",)
    assert decl.format is None  # detected from the files later


def test_several_documents_in_one_file() -> None:
    text = KSERVE_STYLE + "---\n" + KSERVE_STYLE.replace("llama-mini", "other")
    assert [d.name for d in parse_declarations(text)] == ["llama-mini", "other"]


def test_our_fields() -> None:
    text = KSERVE_STYLE + (
        "  format: onnx\n  replicas: 2\n"
        "  warm: {minReplicas: 1, maxReplicas: 3, pinned: true, idleTimeout: 10m}\n"
        "  batching: {maxBatchSize: 16, maxQueueDelay: 500us}\n"
    )
    (decl,) = parse_declarations(text)
    assert decl.format == "onnx" and decl.replicas == 2
    assert (decl.warm.min_replicas, decl.warm.max_replicas, decl.warm.pinned) == (1, 3, True)
    assert decl.warm.idle_timeout == "10m" and decl.warm.idle_seconds == 600
    assert decl.batching == (16, 0.0005)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("apiVersion: nodecache.io/v1alpha1", "apiVersion: v1"), "apiVersion must be"),
        (("kind: LocalModelCache", "kind: Pod"), "kind must be LocalModelCache"),
        (("name: llama-mini", "name: Llama_Mini"), "metadata.name must be"),
        (("  sourceModelUri: gs://models/llama-mini\n", ""), "spec.sourceModelUri is required"),
        (("gs://models/llama-mini", "ftp://x/y"), "unknown scheme 'ftp'"),
        (("gs://models/llama-mini", "/abs/path"), "missing scheme"),
        (("  modelSize: 1.5Gi\n", ""), "spec.modelSize is required"),
        (("1.5Gi", "big"), "not a Kubernetes quantity"),
        (("1.5Gi", "'-1Gi'"), "must be positive"),
        (("[gpu-a100]", "[]"), "spec.nodeGroups must be a list"),
        (("nodeGroups: [gpu-a100]", "nodeGroups: [gpu-a100]\n  format: tensorflow"),
         "spec.format must be one of"),
        (("nodeGroups: [gpu-a100]", "nodeGroups: [gpu-a100]\n  warm: {minReplicas: 3, "
          "maxReplicas: 1}"), "minReplicas must not exceed maxReplicas"),
        (("nodeGroups: [gpu-a100]", "nodeGroups: [gpu-a100]\n  warm: {idleTimeout: soon}"),
         "idleTimeout must be a duration"),
        (("metadata:\n  name: llama-mini\n", "metadata: {}\n"), "metadata.name must be"),
        (("nodeGroups: [gpu-a100]", "nodeGroups: [gpu-a100]\n  batching: {maxQueueDelay: 1ms}"),
         "maxBatchSize is required"),
    ],
)  # fmt: skip
def test_invalid_fields_are_named(change: tuple[str, str], message: str) -> None:
    text = KSERVE_STYLE.replace(*change)
    assert text != KSERVE_STYLE
    with pytest.raises(DeclarationError, match=message):
        parse_declarations(text)


def test_bad_yaml_and_empty_files() -> None:
    with pytest.raises(DeclarationError, match="not valid YAML"):
        parse_declarations("spec: [")
    with pytest.raises(DeclarationError, match="no declaration"):
        parse_declarations("# nothing here\n")
    with pytest.raises(DeclarationError, match="expected a mapping"):
        parse_declarations("- a\n- b\n")


async def test_a_file_written_while_the_watcher_starts_is_not_lost(tmp_path: Path) -> None:
    """No event is ever raised for a file written between the first read of the folder and
    the start of the watcher; the periodic rescan must pick it up (it once went unseen)."""
    folder = DeclarationFolder(tmp_path)
    snapshots = folder.watch(rescan=0.2)
    first = await anext(snapshots)
    assert first.declarations == {}
    # The watcher starts on the next step of the generator: write before taking it.
    (tmp_path / "m.yaml").write_text(KSERVE_STYLE)
    try:
        snapshot = await asyncio.wait_for(anext(snapshots), 10)
    finally:
        await snapshots.aclose()
    assert list(snapshot.declarations) == ["llama-mini"], snapshot.errors


def test_serving_defaults_to_the_name_version_1_and_all_traffic() -> None:
    (decl,) = parse_declarations(KSERVE_STYLE)
    assert decl.serving == Serving("llama-mini", "1", 100, 0)
    assert decl.namespace is None and decl.key == "llama-mini"


def test_serving_fields() -> None:
    text = KSERVE_STYLE + '  serving: {name: llama, version: "2.1-rc_1", traffic: 0, mirror: 50}\n'
    (decl,) = parse_declarations(text)
    assert decl.serving == Serving("llama", "2.1-rc_1", 0, 50)


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ("[a]", "spec.serving must be a mapping"),
        ("{name: Fraud}", "spec.serving.name must be a lowercase DNS name"),
        ("{version: 2}", r"spec.serving.version must be a string .*quote numbers"),
        ("{version: ''}", "spec.serving.version must be"),
        ("{version: a/b}", "spec.serving.version must be"),
        ("{version: '..'}", "spec.serving.version must be"),
        ("{version: '.'}", "spec.serving.version must be"),
        ("{version: " + "v" * 65 + "}", "spec.serving.version must be"),
        ("{traffic: -1}", "traffic must be an integer >= 0"),
        ("{traffic: '10'}", "traffic must be an integer >= 0"),
        ("{mirror: 101}", "mirror is a percent"),
        ("{mirror: true}", "mirror must be an integer"),
    ],
)
def test_invalid_serving_is_named(serving: str, message: str) -> None:
    with pytest.raises(DeclarationError, match=message):
        parse_declarations(KSERVE_STYLE + f"  serving: {serving}\n")


def test_serving_changes_keep_the_model() -> None:
    """A weight or version edit reroutes requests; it never refetches nor reloads."""
    (before,) = parse_declarations(KSERVE_STYLE)
    (after,) = parse_declarations(KSERVE_STYLE + "  serving: {version: '2', traffic: 5}\n")
    assert before.same_model(after) and before != after


def test_a_namespace_cache_is_keyed_by_its_namespace() -> None:
    doc = yaml.safe_load(KSERVE_STYLE.replace("LocalModelCache", "LocalModelNamespaceCache"))
    doc["metadata"]["namespace"] = "team-a"
    decl = parse_object(doc)
    assert (decl.namespace, decl.key, decl.serving.name) == (
        "team-a",
        "team-a/llama-mini",
        "llama-mini",
    )
    del doc["metadata"]["namespace"]
    with pytest.raises(DeclarationError, match=r"needs metadata\.namespace"):
        parse_object(doc)
    # A cluster cache has no namespace, whatever its metadata says.
    cluster = parse_object(
        {**yaml.safe_load(KSERVE_STYLE), "metadata": {"name": "m", "namespace": "x"}}
    )
    assert cluster.namespace is None and cluster.key == "m"


def test_the_later_declaration_of_a_version_is_refused() -> None:
    def decl(
        name: str, served: str, version: str, namespace: str | None = None
    ) -> ModelDeclaration:
        text = KSERVE_STYLE.replace("llama-mini", name)
        (parsed,) = parse_declarations(
            text + f"  serving: {{name: {served}, version: '{version}'}}\n"
        )
        return replace(parsed, namespace=namespace)

    declared = [
        decl("fraud-v1", "fraud", "1"),
        decl("fraud-v2", "fraud", "2"),
        decl("fraud-again", "fraud", "1"),
        decl("fraud-v1", "fraud", "1", namespace="team-a"),  # another scope: its own name
        decl("other", "fraud", "1", namespace="team-a"),
    ]
    kept, refused = refuse_duplicate_versions({d.key: d for d in declared})
    assert list(kept) == ["fraud-v1", "fraud-v2", "team-a/fraud-v1"]
    assert set(refused) == {"fraud-again", "team-a/other"}
    assert "version '1' of 'fraud' is already served by fraud-v1" in refused["fraud-again"]
    assert "namespace team-a" in refused["team-a/other"]


async def test_standalone_refuses_a_second_file_with_the_same_version(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(KSERVE_STYLE)
    (tmp_path / "b.yaml").write_text(
        KSERVE_STYLE.replace("name: llama-mini", "name: copy") + "  serving: {name: llama-mini}\n"
    )
    snapshot = await asyncio.to_thread(DeclarationFolder(tmp_path).read)
    declarations, errors = _one_per_version(snapshot)
    assert list(declarations) == ["llama-mini"]
    assert "already served by llama-mini" in errors["b.yaml"]
