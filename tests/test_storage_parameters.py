"""A cache's ``spec.storage.parameters`` reach its source through a real agent: here the
Hugging Face source's ``include`` globs, against the fake Hub."""

from __future__ import annotations

from pathlib import Path

import pytest
from hfhub import FakeHub
from support import Agent, declaration


def test_storage_parameters_choose_the_files_a_source_fetches(
    agent: Agent, mlp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHub() as hub:
        hub.commit("org/mlp", {
            "model.onnx": (mlp_dir / "model.onnx").read_bytes(),
            "original/weights.bin": b"x" * 300_000,  # what users skip in large repos
            "README.md": b"# mlp\n",
        })  # fmt: skip
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        agent.start()
        agent.declare("mlp.yaml", declaration(
            "mlp", "hf://org/mlp", storage={"parameters": {"include": "*.onnx,*.md"}}
        ))  # fmt: skip
        model = agent.wait_state("mlp", "Warm")
    folder = next((agent.cache_dir / "models").iterdir())
    assert (folder / "model.onnx").read_bytes() == (mlp_dir / "model.onnx").read_bytes()
    assert (folder / "README.md").is_file()
    assert not (folder / "original").exists()
    assert model["resolved"].startswith("commit ")
