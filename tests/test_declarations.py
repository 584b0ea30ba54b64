"""Declarations: what a KServe user writes works; what is wrong is refused by field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nodecache.agent.declarations import DeclarationError, parse_declarations
from nodecache.agent.files import DeclarationFolder

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
