"""ONNX loading: large inline models load from a mapped copy with external data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from nodecache.cache import DERIVED_DIR
from nodecache.serve.examples import write_mlp_onnx
from nodecache.serve.runtimes import onnx as onnx_runtime
from nodecache.serve.runtimes.onnx import OnnxRuntime, find_onnx_file


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_runtime, "MAPPED_MIN_BYTES", 64 * 1024)


def write_model(folder: Path, seed: int = 0, name: str = "net.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # 64 x 512 + 512 x 10 FP32 weights: ~150 KiB, above the test's threshold.
    return write_mlp_onnx(folder / name, hidden=512, seed=seed)


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def answer(runtime: OnnxRuntime, x: np.ndarray) -> np.ndarray:
    return next(iter(runtime.predict({runtime.inputs[0].name: x}, None).values()))


X = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)


def test_large_inline_model_answers_the_same_from_its_mapped_copy(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m")
    expected = reference(model, X)

    runtime = OnnxRuntime.from_dir(tmp_path / "m")

    np.testing.assert_allclose(answer(runtime, X), expected, rtol=1e-5, atol=1e-5)
    weights = tmp_path / "m" / DERIVED_DIR / "onnx-net" / "weights.bin"
    assert weights.stat().st_size >= (64 * 512 + 512 * 10) * 4
    assert runtime.resident_bytes is not None and runtime.resident_bytes > weights.stat().st_size
    # The original is untouched (its bytes are what the cache verified), and the derived
    # copy does not count as a second .onnx file of the model.
    assert find_onnx_file(tmp_path / "m") == model

    built = weights.stat().st_mtime_ns
    again = OnnxRuntime.from_dir(tmp_path / "m")  # a reload, or a second worker
    np.testing.assert_allclose(answer(again, X), expected, rtol=1e-5, atol=1e-5)
    assert weights.stat().st_mtime_ns == built, "the copy is built once, then reused"


def test_small_models_load_as_they_are(tmp_path: Path) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    model = write_mlp_onnx(folder / "model.onnx")  # ~10 KiB
    runtime = OnnxRuntime.from_dir(folder)
    np.testing.assert_allclose(answer(runtime, X), reference(model, X), rtol=1e-5, atol=1e-5)
    assert not (folder / DERIVED_DIR).exists()


def test_a_changed_model_file_gets_a_new_copy(tmp_path: Path) -> None:
    write_model(tmp_path / "m", seed=0)
    OnnxRuntime.from_dir(tmp_path / "m")
    model = write_model(tmp_path / "m", seed=1)  # same name, other weights

    runtime = OnnxRuntime.from_dir(tmp_path / "m")

    np.testing.assert_allclose(answer(runtime, X), reference(model, X), rtol=1e-5, atol=1e-5)


def test_model_loads_unmapped_when_no_copy_can_be_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = write_model(tmp_path / "m")
    (tmp_path / "m" / DERIVED_DIR).write_text("in the way")  # mkdir fails, as on a full disk

    with caplog.at_level(logging.WARNING, logger="nodecache.serve.runtimes.onnx"):
        runtime = OnnxRuntime.from_dir(tmp_path / "m")

    np.testing.assert_allclose(answer(runtime, X), reference(model, X), rtol=1e-5, atol=1e-5)
    assert "loading" in caplog.text and "unmapped" in caplog.text
