"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it.

A holder renews the lease every ``retry_period``; another candidate takes it over only
after it has seen the same renewTime for ``lease_duration`` on its own clock (no trust in
clocks across machines). Writes use the lease's resourceVersion, so two candidates can
never both win: the loser gets a 409. The leader's work is cancelled as soon as a renewal
has failed for ``renew_deadline``, before anyone else may take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nodecache.agent.kube.api import LEASES, Kube
from nodecache.agent.kube.errors import ApiConflict, ApiError, ApiNotFound

__all__ = ["LeaderElector"]

log = logging.getLogger(__name__)


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        assert lease_duration > renew_deadline > retry_period
        self.kube = kube
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.leading = False
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Forever: wait to lead, run ``work`` while leading, stop it when the lease is lost."""
        while True:
            while not await self._try():
                await asyncio.sleep(self.retry_period)
            log.info("leading", extra={"lease": self.name, "identity": self.identity})
            self.leading = True
            task = asyncio.create_task(work())
            try:
                await self._keep(task)
            except asyncio.CancelledError:
                await self._release()  # shutting down: let a standby take over at once
                raise
            finally:
                self.leading = False
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            log.warning("lost the lease", extra={"lease": self.name, "identity": self.identity})

    async def _keep(self, task: asyncio.Task[None]) -> None:
        last_renewal = time.monotonic()
        while not task.done():
            await asyncio.sleep(self.retry_period)
            if await self._try():
                last_renewal = time.monotonic()
            elif time.monotonic() - last_renewal > self.renew_deadline:
                return
        task.result()  # the work ended on its own: surface its error

    async def _try(self) -> bool:
        """Acquire or renew; True when this candidate holds the lease afterwards."""
        now = _micro_time()
        try:
            lease = await self.kube.get(LEASES, self.name, self.namespace)
        except ApiNotFound:
            body = {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now, now, 0),
            }
            try:
                await self.kube.create(LEASES, body, self.namespace)
                return True
            except ApiError:
                return False
        except ApiError as exc:
            log.warning("lease not readable", extra={"error": str(exc)})
            return False
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        observed = (holder, spec.get("renewTime"))
        if observed != self._observed:
            self._observed, self._observed_at = observed, time.monotonic()
        expired = time.monotonic() - self._observed_at > self.lease_duration
        if holder and holder != self.identity and not expired:
            return False
        transitions = spec.get("leaseTransitions") or 0
        if holder == self.identity:
            acquired = spec.get("acquireTime") or now
        else:
            acquired, transitions = now, transitions + 1
        lease["spec"] = self._spec(acquired, now, transitions)
        try:
            await self.kube.replace(LEASES, lease)
        except ApiConflict:
            return False  # someone else wrote first
        except ApiError as exc:
            log.warning("lease not renewed", extra={"error": str(exc)})
            return False
        return True

    async def _release(self) -> None:
        """Give the lease up (as client-go's ReleaseOnCancel): no holder, expired at once."""
        try:
            lease = await self.kube.get(LEASES, self.name, self.namespace)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**spec, "holderIdentity": None, "leaseDurationSeconds": 1,
                             "renewTime": _micro_time()}  # fmt: skip
            await self.kube.replace(LEASES, lease)
            log.info("lease released", extra={"lease": self.name, "identity": self.identity})
        except ApiError as exc:
            log.info("lease not released", extra={"error": str(exc)})

    def _spec(self, acquired: str, renewed: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration),
            "acquireTime": acquired,
            "renewTime": renewed,
            "leaseTransitions": transitions,
        }
