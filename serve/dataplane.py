"""The Open Inference Protocol's operations, independent of any transport.

HTTP and gRPC adapters parse the wire and call these; a request is checked against the
model's declared tensors here, once (with ``checking.TensorChecks``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from random import random
from time import perf_counter, perf_counter_ns
from typing import Any, Protocol

import numpy as np

from nodecache.serve.batching import Batcher
from nodecache.serve.checking import TensorChecks
from nodecache.serve.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    OutputTooLarge,
    ServeError,
    excerpt,
)
from nodecache.serve.metrics import BATCH_SIZE, UNKNOWN_MODEL, child, request_stats
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
from nodecache.serve.runtime import Runtime
from nodecache.serve.spec import ModelState
from nodecache.serve.tensors import encoded_size
from nodecache.serve.triton.config import model_config
from nodecache.serve.triton.shm import (
    RequestRegions,
    SharedMemory,
    place_outputs,
    resolve_inputs,
)
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
        self._checks: dict[str, TensorChecks] = {}
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
        # A copy must not read or write the caller's memory (as in worker mode).
        shared = request.regions is not None
        if route is not None and version is None and self.router is not None and not shared:
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
                checks = self._checks_of(key, runtime)
                inputs = checks.check_inputs(request.inputs)
                wanted = checks.check_outputs(request) if request.outputs is not None else None
                names = list(wanted) if wanted else None
                timing.checked, timing.rows = perf_counter_ns(), checks.rows(inputs)
                if model.batching is not None:
                    outputs = await self._batcher(model).submit(inputs, timing)
                    if wanted:
                        outputs = {n: outputs[n] for n in wanted if n in outputs}
                elif _inline(model, inputs) and not model.slots.locked():
                    # Runs to the end without yielding to the loop: taking a free slot and
                    # giving it back around it would change nothing.
                    checks.queue_seconds.observe(perf_counter() - started)
                    began = perf_counter()
                    timing.began = perf_counter_ns()
                    outputs = runtime.predict(inputs, names)
                    self._predicted(model, began, inputs)
                    timing.ended = perf_counter_ns()
                else:
                    async with model.slots:
                        checks.queue_seconds.observe(perf_counter() - started)
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

    def _checks_of(self, name: str, runtime: Runtime) -> TensorChecks:
        """The model's prepared tensor checks, rebuilt only when a new load changed it."""
        checks = self._checks.get(name)
        if checks is None or not (
            checks.inputs is runtime.inputs and checks.outputs is runtime.outputs
        ):
            checks = self._checks[name] = TensorChecks(name, runtime.inputs, runtime.outputs)
        return checks

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
        checks = self._checks[model.name]
        checks.inference_seconds.observe(took)
        self.statistics.executed(model.name, checks.rows(inputs), round(took * 1e9))

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
        (``request.regions``): inputs are read there, outputs written there, each on the
        request's own descriptor, closed at its end."""
        regions = request.regions
        assert isinstance(regions, RequestRegions), "the transport names the caller's regions"
        with regions:
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
