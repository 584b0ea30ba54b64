"""Custom Python models (``serve.Model``): opt-in only, with pre- and post-processing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from support import Agent, declaration

from nodecache.agent.declarations import DeclarationError, parse_declarations

MODEL_PY = """
import json
import numpy as np
from nodecache.serve import Model
from nodecache.serve.runtimes import TensorSpec
from helpers import scale  # a sibling module in the model folder


class Scaler(Model):
    inputs = [TensorSpec("text", "BYTES", (-1,))]
    outputs = [TensorSpec("length", "INT64", (-1,)), TensorSpec("label", "BYTES", (-1,))]

    def load(self):
        self.factor = json.loads((self.model_dir / "config.json").read_text())["factor"]

    def preprocess(self, inputs):
        return [t.decode() for t in inputs["text"]]

    def predict(self, words):
        return [scale(len(w), self.factor) for w in words]

    def postprocess(self, lengths):
        return {
            "length": np.array(lengths, dtype=np.int64),
            "label": np.array(["long" if n > 10 else "short" for n in lengths], dtype=object),
        }
"""


@pytest.fixture
def custom_model(tmp_path: Path) -> Path:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "model.py").write_text(MODEL_PY)
    (folder / "helpers.py").write_text("def scale(n, f):\n    return n * f\n")
    (folder / "config.json").write_text('{"factor": 3}')
    return folder


def test_python_model_with_pre_and_post_processing(agent: Agent, custom_model: Path) -> None:
    agent.start()
    agent.declare(
        "custom.yaml",
        declaration("custom", custom_model.as_uri(), runtime="python", entrypoint="model:Scaler"),
    )
    agent.wait_state("custom", "Warm")
    code, meta = agent.request("GET", "/v2/models/custom")
    assert code == 200 and meta["platform"] == "python"
    assert [i["name"] for i in meta["inputs"]] == ["text"]
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                        "data": ["abc", "abcdef"]}]}  # fmt: skip
    code, answer = agent.request("POST", "/v2/models/custom/infer", body)
    assert code == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["length"]["data"] == [9, 18]
    assert outputs["length"]["datatype"] == "INT64"
    assert outputs["label"]["data"] == ["short", "long"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("  entrypoint: model:Scaler\n", "it needs spec.runtime: python"),
        ("  format: python\n  entrypoint: model:Scaler\n", "opt in with spec.runtime: python"),
        ("  runtime: python\n", "needs spec.entrypoint"),
        ("  runtime: python\n  entrypoint: not-valid\n", "must look like 'module:Class'"),
    ],
)
def test_code_from_a_source_runs_only_with_the_opt_in(extra: str, message: str) -> None:
    text = (
        textwrap.dedent("""\
        apiVersion: nodecache.io/v1alpha1
        kind: LocalModelCache
        metadata: {name: custom}
        spec:
          sourceModelUri: s3://bucket/custom
          modelSize: 1Mi
          nodeGroups: [default]
        """)
        + extra
    )
    with pytest.raises(DeclarationError, match=message):
        parse_declarations(text)


async def test_entrypoint_that_is_not_a_model_is_refused(custom_model: Path) -> None:
    from nodecache.serve.repository import ModelRepository

    (custom_model / "bad.py").write_text("class NotAModel:\n    pass\n")
    repo = ModelRepository()
    repo.register("bad", custom_model, "python", entrypoint="bad:NotAModel")
    with pytest.raises(Exception, match=r"not a serve\.Model subclass"):
        await repo.load("bad")
    assert repo.get("bad").state == "Error"
