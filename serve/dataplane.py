"""The Open Inference Protocol's operations, independent of any transport.

HTTP (and later gRPC) adapters parse the wire and call these; validation of a
request against the model's declared inputs happens here, once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from random import random
from time import perf_counter, perf_counter_ns
from typing import Any, NoReturn, Protocol

import numpy as np

from nodecache.serve.batching import Batcher
from nodecache.serve.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    OutputTooLarge,
    ServeError,
    excerpt,
)
from nodecache.serve.metrics import (
    BATCH_SIZE,
    INFERENCE_SECONDS,
    QUEUE_SECONDS,
    UNKNOWN_MODEL,
    child,
    request_stats,
)
from nodecache.serve.mirror import Mirror, Outputs
from nodecache.serve.protocol import (
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_OUTPUT_BYTES,
    OFFLOAD_BYTES,
    InferRequest,
    InferResponse,
    sized_work,
    tensor_bytes,
)
from nodecache.serve.repository import ModelRepository, ServedModel
from nodecache.serve.routing import Caller, Route, Router, nobody
from nodecache.serve.runtime import Runtime, TensorSpec
from nodecache.serve.spec import ModelState
from nodecache.serve.tensors import DATATYPES, datatype_of, encoded_size
from nodecache.serve.triton.config import has_batch_dimension, model_config
from nodecache.serve.triton.shm import SharedMemory, place_outputs, resolve_inputs
from nodecache.serve.triton.statistics import RequestTiming, Statistics, statistics_routes

__all__ = ["MODEL_VERSION", "SERVER_NAME", "Catalog", "DataPlane", "check_version"]

SERVER_NAME = "nodecache"
SERVER_VERSION = "0.1.0"
# A model's version when its declaration names none; clients may name it or not.
MODEL_VERSION = "1"
# What a version may look like anywhere (REST path, gRPC field): refused with 400 otherwise.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
EXTENSIONS = [
    "model_repository",
    "binary_tensor_data",
    "model_configuration",
    "statistics",
    "system_shared_memory",
]
# Runtime calls that typically take less than this run on the event loop itself.
INLINE_PREDICT_SECONDS = 0.0005


class Catalog(Protocol):
    """What the agent knows about models the repository does not hold (yet)."""

    def not_ready_reason(self, name: str) -> str | None:
        """Why a declared model cannot answer yet, or None if it is not declared."""


class _NoCatalog:
    def not_ready_reason(self, name: str) -> str | None:
        return None


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        catalog: Catalog | None = None,
        executor: ThreadPoolExecutor | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        router: Router | None = None,
        mirror: Mirror | None = None,
    ) -> None:
        self.repository = repository
        self.max_output_bytes = max_output_bytes
        self.catalog: Catalog = catalog or _NoCatalog()
        # None: each registered model answers under its own name (a worker, whose requests
        # the agent routed already; a repository without an agent).
        self.router = router
        self.mirror = mirror or Mirror()
        self._executor = executor or ThreadPoolExecutor(thread_name_prefix="predict")
        self._batchers: dict[str, Batcher] = {}
        self._specs: dict[str, _ModelSpec] = {}
        self.statistics = Statistics()
        self.shared_memory = SharedMemory()

    # -- lookups -------------------------------------------------------------

    def resolve(self, name: str, version: str | None, caller: Caller) -> tuple[str, Route | None]:
        """The one check of a model name and version, whatever the protocol: a version
        must look like one (400) and be one the model has (404); then the key of the model
        that answers, and its route (chosen by weight when no version is named)."""
        check_version(version)
        if self.router is None:
            self._check(name, version)
            return name, None
        table = self.router.table
        route = table.choose(
            name, version, caller, self._state_of, random(), self.catalog.not_ready_reason
        )
        return route.key, route

    def admit(self, name: str, caller: Caller) -> None:
        """403 for a name the caller may not use, before its request body is read (an
        unknown name is counted as such by ``infer``)."""
        if self.router is not None and self.router.table.knows(name):
            self.router.table.versions(name, caller)

    def _check(self, name: str, version: str | None) -> None:
        if name not in self.repository:
            reason = self.catalog.not_ready_reason(name)
            if reason is None:
                raise ModelNotFound(name)
            raise ModelNotReady(f"model '{name}' is not ready: {reason}")
        model = self.repository.get(name)
        if version is not None and model is not None and version != model.spec.version:
            raise ModelNotFound(name, version)

    def _state_of(self, key: str) -> ModelState | None:
        model = self.repository.get(key)
        return None if model is None else model.state

    def _metric_label(self, name: str) -> str:
        """The model label of a request refused before a model was chosen: its name only
        for a name this node declares, so callers cannot mint series with made-up names."""
        if self.router is not None:
            return name if self.router.table.knows(name) else UNKNOWN_MODEL
        if name in self.repository or self.catalog.not_ready_reason(name) is not None:
            return name
        return UNKNOWN_MODEL

    async def _check_output_size(self, outputs: dict[str, np.ndarray]) -> None:
        """Refuse an answer above ``max_output_bytes`` (a 90-byte request can ask a
        ConstantOfShape model for gigabytes) before anything is encoded."""
        size = tensor_bytes(outputs)
        if any(a.dtype.kind in "OSU" for a in outputs.values()):
            size = await sized_work(size, _encoded_total, outputs)
        if size > self.max_output_bytes:
            raise OutputTooLarge(
                f"the answer would carry {size} bytes of output tensors, over the limit of "
                f"{self.max_output_bytes}; ask for fewer outputs or send a smaller batch"
            )

    # -- health and metadata -------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None = None, caller: Caller = nobody) -> bool:
        """Ready means: answers without waiting for a download (it may still need a load);
        without a version, some version takes the name's unpinned requests."""
        key, _ = self.resolve(name, version, caller)
        model = self.repository.get(key)
        return model is not None and model.state != ModelState.ERROR

    async def model_metadata(
        self, name: str, version: str | None = None, caller: Caller = nobody
    ) -> dict[str, Any]:
        """The named version's metadata, else the main version's (most traffic, warm first);
        ``versions`` lists every version of the name the caller may use."""
        key, versions = self._described(name, version, caller)
        async with self.repository.use(key) as model:
            runtime = _runtime(model)
            return {
                "name": model.spec.served,
                "versions": versions,
                "platform": runtime.platform,
                "inputs": [s.to_json() for s in runtime.inputs],
                "outputs": [s.to_json() for s in runtime.outputs],
            }

    def _described(self, name: str, version: str | None, caller: Caller) -> tuple[str, list[str]]:
        """The model metadata (and configuration) describe, and the name's versions."""
        check_version(version)
        if self.router is None:
            self._check(name, version)
            spec = self.repository.get(name)
            return name, [spec.spec.version if spec else MODEL_VERSION]
        table = self.router.table
        key = table.main(name, version, caller, self._state_of).key
        return key, [r.version for r in table.versions(name, caller)]

    # -- inference -----------------------------------------------------------

    async def infer(
        self,
        name: str,
        request: InferRequest,
        version: str | None = None,
        *,
        protocol: str = "rest",
        caller: Caller = nobody,
    ) -> InferResponse:
        """Run one request on the version routing chooses (a copy to each mirror chosen);
        records its metrics under ``protocol`` whatever the outcome."""
        try:
            key, route = self.resolve(name, version, caller)
        except ServeError as exc:
            stats = request_stats(self._metric_label(name), "", protocol)
            stats.inflight.inc()
            stats.done(str(exc.status), 0.0)
            raise
        response = await self.infer_model(key, request, protocol)
        if route is not None and version is None and self.router is not None:
            table = self.router.table
            if table.has_mirrors(name):
                for mirror in table.mirrors(name, route, caller, random):
                    self.mirror.offer(
                        mirror,
                        lambda key=mirror.key: self._mirrored(key, request),
                        _outputs_of(response),
                    )
        return response

    async def _mirrored(self, key: str, request: InferRequest) -> Outputs:
        if key not in self.repository:
            raise ModelNotFound(key)
        return (await self.infer_model(key, request, "mirror")).outputs

    async def infer_model(self, key: str, request: InferRequest, protocol: str) -> InferResponse:
        """One request on the model ``key`` (registered: ``resolve`` said so)."""
        started = perf_counter()
        served = self.repository.get(key)
        version = served.spec.version if served is not None else ""
        stats = request_stats(key, version, protocol)
        stats.inflight.inc()
        code = "500"
        timing: RequestTiming | None = None
        try:
            timing = RequestTiming()
            async with self.repository.use(key) as model:
                runtime = _runtime(model)
                spec = self._spec(key, runtime)
                inputs = spec.check_inputs(request.inputs)
                wanted = spec.check_outputs(request) if request.outputs is not None else None
                names = list(wanted) if wanted else None
                timing.checked, timing.rows = perf_counter_ns(), spec.rows(inputs)
                if model.batching is not None:
                    outputs = await self._batcher(model).submit(inputs, timing)
                    if wanted:
                        outputs = {n: outputs[n] for n in wanted if n in outputs}
                elif _inline(model, inputs) and not model.slots.locked():
                    # Runs to the end without yielding to the loop: taking a free slot and
                    # giving it back around it would change nothing.
                    spec.queue_seconds.observe(perf_counter() - started)
                    began = perf_counter()
                    timing.began = perf_counter_ns()
                    outputs = runtime.predict(inputs, names)
                    self._predicted(model, began, inputs)
                    timing.ended = perf_counter_ns()
                else:
                    async with model.slots:
                        spec.queue_seconds.observe(perf_counter() - started)
                        timing.began = perf_counter_ns()
                        outputs = await self._predict(model, inputs, names)
                        timing.ended = perf_counter_ns()
            await self._check_output_size(outputs)
            response = InferResponse(
                model.spec.served,
                model.spec.version,
                outputs,
                request.id,
                wanted or dict.fromkeys(outputs, request.binary_outputs),
            )
            code = "200"
            return response
        except ServeError as exc:
            code = str(exc.status)
            raise
        finally:
            stats.done(code, perf_counter() - started)
            if timing is not None:
                self.statistics.record(key, timing, ok=code == "200")

    def _spec(self, name: str, runtime: Runtime) -> _ModelSpec:
        """The model's prepared tensor spec, rebuilt only when a new load changed it."""
        spec = self._specs.get(name)
        if spec is None or spec.inputs is not runtime.inputs or spec.outputs is not runtime.outputs:
            spec = self._specs[name] = _ModelSpec(name, runtime.inputs, runtime.outputs)
        return spec

    async def _predict(
        self, model: ServedModel, inputs: dict[str, np.ndarray], names: list[str] | None
    ) -> dict[str, np.ndarray]:
        runtime = _runtime(model)
        began = perf_counter()
        if _inline(model, inputs):
            outputs = runtime.predict(inputs, names)
        else:
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self._executor, runtime.predict, inputs, names)
        self._predicted(model, began, inputs)
        return outputs

    def _predicted(self, model: ServedModel, began: float, inputs: dict[str, np.ndarray]) -> None:
        took = perf_counter() - began
        typical = model.typical_predict
        model.typical_predict = took if typical is None else 0.9 * typical + 0.1 * took
        spec = self._specs[model.name]
        spec.inference_seconds.observe(took)
        self.statistics.executed(model.name, spec.rows(inputs), round(took * 1e9))

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

    # -- Triton's extensions (serve/triton/) ------------------------------------

    async def model_config(
        self, name: str, version: str | None = None, caller: Caller = nobody
    ) -> dict[str, Any]:
        """The configuration of the version metadata describes, as Triton prints it."""
        key, versions = self._described(name, version, caller)
        async with self.repository.use(key) as model:
            runtime = _runtime(model)
            device = model.device
            return model_config(
                model.spec.served,
                platform=runtime.platform,
                inputs=runtime.inputs,
                outputs=runtime.outputs,
                versions=versions,
                batching=model.batching,
                device_kind=device.kind if device else "cpu",
                device_index=int(device.name.partition(":")[2] or 0) if device else 0,
                concurrency=self.repository.max_concurrency,
            )

    async def model_statistics(
        self, name: str | None = None, version: str | None = None, caller: Caller = nobody
    ) -> dict[str, Any]:
        """Triton's statistics of a name's versions (or one of them) or, without a name, of
        every version the caller may use; each under its served name and version."""
        check_version(version)
        if self.router is None:  # a worker, or a repository without an agent: by key
            if name is not None:
                self._check(name, version)
            models = self.repository.models() if name is None else [self.repository.get(name)]
            versions = [(m.name, m.spec.served, m.spec.version) for m in models if m]
        else:
            routes = statistics_routes(self.router.table, name, version, caller)
            versions = [(r.key, r.name, r.version) for r in routes if r.key in self.repository]
        return self.statistics.report(versions)

    async def infer_shared(
        self,
        name: str,
        request: InferRequest,
        version: str | None = None,
        *,
        protocol: str,
        caller: Caller = nobody,
    ) -> InferResponse:
        """``infer`` for a request with tensors in the caller's shared memory
        (``request.regions``): inputs are read there, outputs written there."""
        regions = request.regions
        assert regions is not None, "the transport names the caller's regions"
        size = sum(r.byte_size for r in request.shared.values())
        await sized_work(size, resolve_inputs, request, regions, DEFAULT_MAX_ELEMENTS)
        result = await self.infer(name, request, version, protocol=protocol, caller=caller)
        await sized_work(tensor_bytes(result.outputs), place_outputs, request, result, regions)
        return result

    # -- model repository extension -----------------------------------------

    def repository_index(self, caller: Caller = nobody) -> list[dict[str, Any]]:
        """Every version the caller may use, by served name."""
        if self.router is None:
            entries = [
                {"name": m.name, "version": m.spec.version, "state": _oip_state(m),
                 "reason": m.error or ""}
                for m in self.repository.models()
            ]  # fmt: skip
            return sorted(entries, key=lambda e: e["name"])
        index = []
        for route in self.router.table.visible(caller):
            model = self.repository.get(route.key)
            if model is None:
                state, reason = "UNAVAILABLE", self.catalog.not_ready_reason(route.key) or ""
            else:
                state, reason = _oip_state(model), model.error or ""
            index.append({"name": route.name, "version": route.version, "state": state,
                          "reason": reason})  # fmt: skip
        return index

    def _keys(self, name: str, caller: Caller) -> list[str]:
        """The registered models of every version of ``name`` (repository load/unload)."""
        if self.router is None:
            self._check(name, None)
            return [name]
        keys = [r.key for r in self.router.table.versions(name, caller) if r.key in self.repository]
        if not keys:
            raise ModelNotReady(f"no version of model '{name}' is ready yet")
        return keys

    async def load(self, name: str, caller: Caller = nobody) -> None:
        for key in self._keys(name, caller):
            await self.repository.load(key)

    async def unload(self, name: str, caller: Caller = nobody) -> None:
        for key in self._keys(name, caller):
            await self.repository.unload(key)


def check_version(version: str | None) -> None:
    """A version must look like one, whatever the protocol (400)."""
    if version is not None and not VERSION_PATTERN.fullmatch(version):
        raise InvalidInput(f"model version {excerpt(version)} is not 1 to 64 of A-Z a-z 0-9 . _ -")


def _outputs_of(response: InferResponse) -> Callable[[], Awaitable[Outputs]]:
    async def outputs() -> Outputs:
        return response.outputs

    return outputs


def _encoded_total(outputs: dict[str, np.ndarray]) -> int:
    return sum(encoded_size(array) for array in outputs.values())


def _inline(model: ServedModel, inputs: dict[str, np.ndarray]) -> bool:
    """Whether this runtime call runs on the event loop itself: handing a call this short
    to a thread costs more than the call (two thread wake-ups, ~0.3 ms here), and blocking
    the loop this long is harmless. Large inputs never do: a model that is quick on what
    it usually gets can take seconds on millions of elements."""
    typical = model.typical_predict
    return (
        typical is not None
        and typical < INLINE_PREDICT_SECONDS
        and tensor_bytes(inputs) <= OFFLOAD_BYTES
    )


def _runtime(model: ServedModel) -> Runtime:
    assert model.runtime is not None, "repository.use() yields loaded models"
    return model.runtime


def _oip_state(model: ServedModel) -> str:
    # The repository extension speaks READY/UNAVAILABLE/LOADING/UNLOADING.
    return {ModelState.WARM: "READY", ModelState.LOADING: "LOADING"}.get(model.state, "UNAVAILABLE")


class _ModelSpec:
    """A model's declared tensors, prepared once per load so each request is checked with
    dict lookups; also the model's queue and inference metrics."""

    def __init__(self, name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs, self.outputs = inputs, outputs
        # name -> (datatype, numpy dtype, rank, (index, size) of each fixed dimension)
        self.expected = {
            s.name: (
                s.datatype,
                DATATYPES[s.datatype],
                len(s.shape),
                tuple((i, d) for i, d in enumerate(s.shape) if d != -1),
            )
            for s in inputs
        }
        self.output_names = {s.name for s in outputs}
        self.batched = has_batch_dimension(inputs, outputs)
        self.queue_seconds = child(QUEUE_SECONDS, name)
        self.inference_seconds = child(INFERENCE_SECONDS, name)

    def rows(self, inputs: dict[str, np.ndarray]) -> int:
        """Inferences one call with these inputs makes: its batch rows, if batched (Triton's
        ``inference_count``)."""
        if not self.batched or not inputs:
            return 1
        first = next(iter(inputs.values()))
        return first.shape[0] if first.ndim else 1

    def check_inputs(self, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = self.expected
        if not expected:  # a custom model that describes no inputs takes what it is given
            return given
        if len(given) != len(expected) or not expected.keys() >= given.keys():
            _refuse_names(self.inputs, given)
        for name, array in given.items():
            datatype, dtype, rank, fixed = expected[name]
            # Arrays decoded from the wire carry the table's dtypes; anything else (another
            # byte order, say) is compared by OIP datatype.
            if array.dtype != dtype:
                _check_datatype(name, array, datatype)
            shape = array.shape
            if len(shape) != rank:
                _refuse_shape(name, shape, self.inputs)
            for i, size in fixed:
                if shape[i] != size:
                    _refuse_shape(name, shape, self.inputs)
        return given

    def check_outputs(self, request: InferRequest) -> dict[str, bool]:
        """Requested outputs -> binary flag."""
        assert request.outputs is not None
        if not self.outputs:
            return {out.name: out.binary for out in request.outputs}
        wanted: dict[str, bool] = {}
        for out in request.outputs:
            if out.name not in self.output_names:
                raise InvalidInput(
                    f"unknown output {excerpt(out.name)}; the model has "
                    f"{', '.join(sorted(self.output_names))}"
                )
            wanted[out.name] = out.binary
        return wanted


def _refuse_names(specs: list[TensorSpec], given: dict[str, np.ndarray]) -> NoReturn:
    """Raise for the first unknown input, else the first missing one."""
    expected = [s.name for s in specs]
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise InvalidInput(
            f"unknown input {excerpt(unknown[0])}; "
            f"the model takes {', '.join(expected) or 'no inputs'}"
        )
    missing = [n for n in expected if n not in given]
    raise InvalidInput(f"input '{missing[0]}' is missing")


def _refuse_shape(name: str, shape: tuple[int, ...], specs: list[TensorSpec]) -> NoReturn:
    spec = next(s for s in specs if s.name == name)
    raise InvalidInput(
        f"input '{name}' has shape {list(shape)}, "
        f"the model expects {list(spec.shape)} (-1 is any size)"
    )


def _check_datatype(name: str, array: np.ndarray, wanted: str) -> None:
    datatype = "BYTES" if array.dtype == DATATYPES["BYTES"] else datatype_of(array)
    if datatype != wanted:
        raise InvalidInput(f"input '{name}' has datatype {datatype}, the model expects {wanted}")
