"""Where models can live: GPUs found through NVML, and the CPU with a memory budget.

Everything above this module asks a ``Device`` for total/used/free and never talks
to NVML directly, so the residency logic runs and is tested on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Device", "default_cpu_budget", "discover_devices"]

log = logging.getLogger(__name__)


@dataclass
class Device:
    """One place models are loaded into; ``budget`` is what nodecache may fill."""

    name: str  # "cpu" or "cuda:N"
    total: int
    budget: int
    used: int = 0  # bytes our warm models take, by the residency manager's accounting

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def free(self) -> int:
        return max(0, self.budget - self.used)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "total": self.total,
            "budget": self.budget,
            "used": self.used,
            "free": self.free,
        }


def _physical_memory() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # A container's limit is what the kernel will enforce, not the host's RAM.
    limit = Path("/sys/fs/cgroup/memory.max")
    try:
        text = limit.read_text().strip()
    except OSError:
        return total
    return min(total, int(text)) if text.isdigit() else total


def default_cpu_budget() -> int:
    """Half of the memory this process may use: room for requests and the OS."""
    return _physical_memory() // 2


def _nvml_devices(gpu_fraction: float) -> list[Device]:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("no GPU: NVML is not available, models run on cpu", extra={"reason": str(exc)})
        return []
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            memory = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            devices.append(
                Device(f"cuda:{index}", int(memory.total), int(memory.total * gpu_fraction))
            )
        if not devices:
            log.info("no GPU: NVML found none, models run on cpu")
        return devices
    finally:
        pynvml.nvmlShutdown()


def discover_devices(
    *, cpu_budget: int | None = None, gpu_fraction: float = 0.9, use_gpus: bool = True
) -> list[Device]:
    """GPUs first (where models go by default), then the CPU."""
    gpus = _nvml_devices(gpu_fraction) if use_gpus else []
    cpu = Device("cpu", _physical_memory(), cpu_budget or default_cpu_budget())
    return [*gpus, cpu]
