"""How the serving tier behaves, in one place: the agent's flags, the node options and each
worker's command line are all read from and written to :class:`ServeSettings`, so a
default is stated once and a setting cannot be dropped on the way to a worker."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

__all__ = ["DEFAULT_MAX_OUTPUT_BYTES", "ServeSettings", "TransportLimits"]

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
"""Most bytes of output tensors one inference answer may carry."""


@dataclass(frozen=True)
class ServeSettings:
    """Settings every model server (the agent in-process, or each worker) runs with."""

    model_concurrency: int = 4
    """Runtime calls one model may run at once."""
    model_queue: int = 256
    """Requests one model may hold, running or waiting; more get 503 with Retry-After."""
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    """Most bytes of output tensors one answer may carry; larger ones are refused (400)."""
    idle_check_seconds: float = 5.0
    """How often models past their idle timeout are unloaded."""
    spread_at: int | None = None
    """In-flight requests per copy at which a hot model gets another copy (None: the model
    concurrency; 0: never). Read by the agent's pool only."""
    log_format: str = "text"
    """One line per event, as text or JSON."""

    @property
    def copies_at(self) -> int:
        """``spread_at`` with its default resolved."""
        return self.model_concurrency if self.spread_at is None else self.spread_at

    def worker_args(self) -> list[str]:
        """This object as a worker's command-line arguments (see :meth:`add_arguments`)."""
        args: list[str] = []
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                args += [f"--{field.name.replace('_', '-')}", str(value)]
        return args

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The options :meth:`worker_args` writes, for the worker's own parser."""
        defaults = cls()
        for field in fields(cls):
            default = getattr(defaults, field.name)
            kind = (
                float if isinstance(default, float) else str if field.name == "log_format" else int
            )
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=default)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> ServeSettings:
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class TransportLimits:
    """Seconds a peer may take. Defaults suit clients on the node; flags change them."""

    # A request head must be complete this long after its first byte (or after the
    # connection opened, for its first request); else 408 and the connection closes.
    header_timeout: float = 10.0
    # A request body must be complete this long after its head; else 408, the connection
    # closes and what arrived is dropped.
    body_timeout: float = 60.0
    # An idle keep-alive connection is closed after this long.
    keepalive_timeout: float = 75.0
