"""The Open Inference Protocol's operations, independent of any transport.

HTTP (and later gRPC) adapters parse the wire and call these; validation of a
request against the model's declared inputs happens here, once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from serve.batching import Batcher
from serve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServeError
from serve.metrics import (
    BATCH_SIZE,
    INFERENCE_SECONDS,
    INFLIGHT,
    QUEUE_SECONDS,
    REQUEST_SECONDS,
    REQUESTS,
    child,
)
from serve.protocol import InferRequest, InferResponse
from serve.repository import ModelRepository, ServedModel, State
from serve.runtimes import Runtime, TensorSpec
from serve.tensors import DATATYPES, datatype_of

__all__ = ["MODEL_VERSION", "SERVER_NAME", "Catalog", "DataPlane"]

SERVER_NAME = "nodecache"
SERVER_VERSION = "0.1.0"
# Each declared model has one version on a node; clients may name it or not.
MODEL_VERSION = "1"
EXTENSIONS = ["model_repository", "binary_tensor_data"]
# Runtime calls that typically take less than this run on the event loop itself.
INLINE_PREDICT_SECONDS = 0.0005


class Catalog(Protocol):
    """What the agent knows about models the repository does not hold (yet)."""

    def not_ready_reason(self, name: str) -> str | None:
        """Why a declared model cannot answer yet, or None if it is not declared."""

    def index(self) -> list[dict[str, Any]]:
        """Repository-index entries for declared models that are not registered."""


class _NoCatalog:
    def not_ready_reason(self, name: str) -> str | None:
        return None

    def index(self) -> list[dict[str, Any]]:
        return []


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        catalog: Catalog | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.repository = repository
        self.catalog: Catalog = catalog or _NoCatalog()
        self._executor = executor or ThreadPoolExecutor(thread_name_prefix="predict")
        self._batchers: dict[str, Batcher] = {}

    # -- lookups -------------------------------------------------------------

    def _check(self, name: str, version: str | None) -> None:
        if name not in self.repository:
            reason = self.catalog.not_ready_reason(name)
            if reason is None:
                raise ModelNotFound(name)
            raise ModelNotReady(f"model '{name}' is not ready: {reason}")
        if version is not None and version != MODEL_VERSION:
            raise ModelNotFound(name, version)

    # -- health and metadata -------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Ready means: answers without waiting for a download (it may still need a load)."""
        self._check(name, version)
        model = self.repository.get(name)
        return model is not None and model.state != State.ERROR

    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self._check(name, version)
        async with self.repository.use(name) as model:
            runtime = _runtime(model)
            return {
                "name": name,
                "versions": [MODEL_VERSION],
                "platform": runtime.platform,
                "inputs": [s.to_json() for s in runtime.inputs],
                "outputs": [s.to_json() for s in runtime.outputs],
            }

    # -- inference -----------------------------------------------------------

    async def infer(
        self,
        name: str,
        request: InferRequest,
        version: str | None = None,
        *,
        protocol: str = "rest",
    ) -> InferResponse:
        """Run one request; records its metrics under ``protocol`` whatever the outcome."""
        started = time.perf_counter()
        code = "500"
        child(INFLIGHT, name).inc()
        try:
            response = await self._infer(name, request, version, started)
            code = "200"
            return response
        except ServeError as exc:
            code = str(exc.status)
            raise
        finally:
            child(INFLIGHT, name).dec()
            child(REQUESTS, name, protocol, code).inc()
            child(REQUEST_SECONDS, name, protocol).observe(time.perf_counter() - started)

    async def _infer(
        self, name: str, request: InferRequest, version: str | None, started: float
    ) -> InferResponse:
        self._check(name, version)
        async with self.repository.use(name) as model:
            runtime = _runtime(model)
            inputs = _validate_inputs(runtime.inputs, request.inputs)
            wanted = _validate_outputs(runtime.outputs, request)
            if model.batching is not None:
                outputs = await self._batcher(model).submit(inputs)
                if wanted:
                    outputs = {n: outputs[n] for n in wanted if n in outputs}
            else:
                async with model.slots:
                    child(QUEUE_SECONDS, name).observe(time.perf_counter() - started)
                    outputs = await self._predict(model, inputs, list(wanted) or None)
        return InferResponse(
            model_name=name,
            model_version=MODEL_VERSION,
            outputs=outputs,
            id=request.id,
            binary=wanted or dict.fromkeys(outputs, request.binary_outputs),
        )

    async def _predict(
        self, model: ServedModel, inputs: dict[str, np.ndarray], names: list[str] | None
    ) -> dict[str, np.ndarray]:
        runtime = _runtime(model)
        began = time.perf_counter()
        if model.typical_predict is not None and model.typical_predict < INLINE_PREDICT_SECONDS:
            # Handing a call this short to a thread costs more than the call itself
            # (two thread wake-ups, ~0.3 ms here); blocking the loop this long is harmless.
            outputs = runtime.predict(inputs, names)
        else:
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self._executor, runtime.predict, inputs, names)
        took = time.perf_counter() - began
        previous = model.typical_predict
        model.typical_predict = took if previous is None else 0.9 * previous + 0.1 * took
        child(INFERENCE_SECONDS, model.name).observe(took)
        return outputs

    def _batcher(self, model: ServedModel) -> Batcher:
        batcher = self._batchers.get(model.name)
        assert model.batching is not None
        if batcher is None or (batcher.max_batch_size, batcher.max_queue_delay) != model.batching:

            async def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                rows = next(iter(inputs.values())).shape[0]
                child(BATCH_SIZE, model.name).observe(rows)
                async with model.slots:
                    return await self._predict(model, inputs, None)

            batcher = self._batchers[model.name] = Batcher(run, *model.batching)
        return batcher

    # -- model repository extension -----------------------------------------

    def repository_index(self) -> list[dict[str, Any]]:
        entries = [
            {
                "name": m.name,
                "version": MODEL_VERSION,
                "state": _oip_state(m),
                "reason": m.error or "",
            }
            for m in self.repository.models()
        ]
        entries.extend(self.catalog.index())
        return sorted(entries, key=lambda e: e["name"])

    async def load(self, name: str) -> None:
        self._check(name, None)
        await self.repository.load(name)

    async def unload(self, name: str) -> None:
        self._check(name, None)
        await self.repository.unload(name)


def _runtime(model: ServedModel) -> Runtime:
    assert model.runtime is not None, "repository.use() yields loaded models"
    return model.runtime


def _oip_state(model: ServedModel) -> str:
    # The repository extension speaks READY/UNAVAILABLE/LOADING/UNLOADING.
    return {State.WARM: "READY", State.LOADING: "LOADING"}.get(model.state, "UNAVAILABLE")


def _validate_inputs(
    specs: list[TensorSpec], given: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    if not specs:  # a custom model that describes no inputs takes what it is given
        return given
    expected = {s.name: s for s in specs}
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise InvalidInput(
            f"unknown input '{unknown[0]}'; the model takes {', '.join(expected) or 'no inputs'}"
        )
    missing = [n for n in expected if n not in given]
    if missing:
        raise InvalidInput(f"input '{missing[0]}' is missing")
    for name, array in given.items():
        spec = expected[name]
        datatype = datatype_of(array) if array.dtype != DATATYPES["BYTES"] else "BYTES"
        if datatype != spec.datatype:
            raise InvalidInput(
                f"input '{name}' has datatype {datatype}, the model expects {spec.datatype}"
            )
        if len(array.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
        ):
            raise InvalidInput(
                f"input '{name}' has shape {list(array.shape)}, "
                f"the model expects {list(spec.shape)} (-1 is any size)"
            )
    return given


def _validate_outputs(specs: list[TensorSpec], request: InferRequest) -> dict[str, bool]:
    """Requested outputs -> binary flag; empty when the client asked for all of them."""
    if request.outputs is None:
        return {}
    if not specs:
        return {out.name: out.binary for out in request.outputs}
    known = {s.name for s in specs}
    wanted: dict[str, bool] = {}
    for out in request.outputs:
        if out.name not in known:
            raise InvalidInput(
                f"unknown output '{out.name}'; the model has {', '.join(sorted(known))}"
            )
        wanted[out.name] = out.binary
    return wanted
