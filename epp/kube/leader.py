"""Leader election on a `coordination.k8s.io/v1` Lease, with client-go's rules (`--ha-enable-leader-election`).

Every replica runs everything (ext_proc, watchers, scrapers), but only the one holding the Lease reports ready,
so the Service sends traffic to it alone: active-passive, as the reference EPP. Unlike the reference, a
standby keeps its pool watched and scraped, so it serves at once when it takes over.

The algorithm (client-go's `leaderelection` package):

* Each `retry_period` a replica reads the Lease. If the Lease does not exist it creates it, holding it. If
  another replica holds it and the record has not changed for `leaseDurationSeconds` (measured on this
  replica's clock from when it last saw the record change, so clocks need not agree), or nobody holds it (a
  released Lease), it takes it over with an update; the update carries the resourceVersion it read, so of two
  replicas racing only one succeeds (the other gets 409 Conflict).
* The holder renews (updates `renewTime`) every `retry_period`. If it has not managed to renew for
  `renew_deadline`, or it sees another holder, it steps down (not ready) and goes back to trying to acquire.
* On shutdown the holder releases the Lease (empty holderIdentity), so a standby takes over within one
  retry period instead of waiting for the lease to expire.

Defaults are controller-runtime's: lease 15 s, renew deadline 10 s, retry 2 s.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from epp.kube.client import KubeApiError
from epp.kube.metrics import KubeMetrics
from epp.kube.objects import LEASES

log = logging.getLogger("epp.kube.leader")

LEASE_SUFFIX = "gateway-api-inference-extension.sigs.k8s.io"


def lease_name(namespace: str, pool_name: str) -> str:
    """The reference EPP's Lease name for a pool: `epp-<namespace>-<pool>.gateway-api-inference-extension...`"""
    return f"epp-{namespace}-{pool_name}.{LEASE_SUFFIX}"


def default_identity() -> str:
    """`<pod name or host name>_<uuid>`: unique even for two EPPs in one pod or on one machine."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4()}"


@dataclass(frozen=True)
class LeaderElectionOptions:
    namespace: str
    lease_name: str
    identity: str
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s > 0:
            raise ValueError("leader election needs lease duration > renew deadline > retry period > 0, got "
                             f"{self.lease_duration_s:g}s, {self.renew_deadline_s:g}s, {self.retry_period_s:g}s")


def _micro_time() -> datetime.datetime:
    """Now, for a Lease's MicroTime fields. The client writes datetimes with isoformat(), which leaves the
    fraction out when it is zero; the API server parses MicroTime with exactly six fraction digits, so the
    fraction is never zero."""
    now = datetime.datetime.now(datetime.UTC)
    return now if now.microsecond else now.replace(microsecond=1)


class LeaderElector:
    def __init__(self, api_client, options: LeaderElectionOptions, metrics: KubeMetrics | None = None,
                 on_change: Callable[[bool], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        from kubernetes.aio import client

        self.options = options
        self.metrics = metrics or KubeMetrics()
        self._client = client
        self._api = client.CoordinationV1Api(api_client)
        self._on_change = on_change
        self._clock = clock
        self._rng = rng or random.Random()
        self.is_leader = False
        self.last_error: str | None = None
        self._observed: tuple | None = None  # (holder, renewTime, acquireTime, transitions) last seen
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._task: asyncio.Task | None = None
        self.metrics.is_leader.set(0)

    async def start(self) -> None:
        o = self.options
        log.info("leader election on Lease %s/%s as %s (lease %gs, renew deadline %gs, retry %gs)", o.namespace,
                 o.lease_name, o.identity, o.lease_duration_s, o.renew_deadline_s, o.retry_period_s)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kube-leader-election")

    async def stop(self) -> None:
        """Stop campaigning and release the Lease if this replica holds it."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.is_leader:
            self._set_leader(False)
            try:
                await asyncio.wait_for(self._release(), timeout=max(1.0, self.options.retry_period_s))
            except Exception as exc:  # the lease then expires by itself
                log.warning("could not release Lease %s: %s", self.options.lease_name, exc)

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        o = self.options
        while True:
            ok = await self._try_acquire_or_renew()
            now = self._clock()
            if ok:
                self._last_renew = now
                self._set_leader(True)
            elif self.is_leader and (now - self._last_renew >= o.renew_deadline_s or self._held_by_other()):
                log.warning("lost the leader-election Lease %s (%s): not ready until it is acquired again",
                            o.lease_name, "another replica holds it" if self._held_by_other() else
                            f"could not renew it for {o.renew_deadline_s:g}s")
                self._set_leader(False)
            delay = o.retry_period_s
            if not self.is_leader:
                delay *= 1 + 0.2 * self._rng.random()  # candidates jitter, as client-go's JitterUntil(…, 1.2)
            await asyncio.sleep(delay)

    def _held_by_other(self) -> bool:
        return self._observed is not None and self._observed[0] not in ("", None, self.options.identity)

    def _set_leader(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        self.metrics.is_leader.set(1 if leader else 0)
        if leader:
            log.info("became the leader (Lease %s/%s): reporting ready", self.options.namespace,
                     self.options.lease_name)
        if self._on_change is not None:
            self._on_change(leader)

    def _error(self, verb: str, exc: Exception) -> None:
        status = getattr(exc, "status", 0) or 0
        self.metrics.api_errors.labels(LEASES.plural, str(status)).inc()
        if status:
            err = KubeApiError(int(status), verb, LEASES, self.options.namespace, str(getattr(exc, "reason", "")),
                               _status_message(exc))
        else:
            err = KubeApiError(0, verb, LEASES, self.options.namespace, detail=f"{type(exc).__name__}: {exc}")
        message = err.explain()
        if message != self.last_error:
            log.warning("leader election: %s", message)
        self.last_error = message

    # ------------------------------------------------------------------ one round

    async def _try_acquire_or_renew(self) -> bool:
        from kubernetes.aio.client.exceptions import ApiException

        o = self.options
        c = self._client
        now_wall = _micro_time()
        timeout = float(max(1.0, o.retry_period_s))
        try:
            lease = await self._api.read_namespaced_lease(o.lease_name, o.namespace, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 404:
                self._error("get", exc)
                return False
            spec = c.V1LeaseSpec(holder_identity=o.identity, lease_duration_seconds=self._lease_seconds(),
                                 acquire_time=now_wall, renew_time=now_wall, lease_transitions=0)
            body = c.V1Lease(metadata=c.V1ObjectMeta(name=o.lease_name, namespace=o.namespace), spec=spec)
            try:
                await self._api.create_namespaced_lease(o.namespace, body, _request_timeout=timeout)
            except ApiException as exc2:
                if exc2.status != 409:  # 409: another replica created it first
                    self._error("create", exc2)
                return False
            except (TimeoutError, OSError) as exc2:
                self._error("create", exc2)
                return False
            self._observe((o.identity, now_wall, now_wall, 0))
            self.last_error = None
            return True
        except (TimeoutError, OSError) as exc:
            self._error("get", exc)
            return False
        except Exception as exc:  # aiohttp.ClientError and friends
            self._error("get", exc)
            return False
        spec = lease.spec or c.V1LeaseSpec()
        record = (spec.holder_identity or "", spec.renew_time, spec.acquire_time, spec.lease_transitions or 0)
        self._observe(record)
        holder = record[0]
        duration = spec.lease_duration_seconds or self._lease_seconds()
        if holder and holder != o.identity and self._observed_at + duration > self._clock():
            return False  # held by another replica and not expired
        if holder == o.identity:
            acquire_time, transitions = spec.acquire_time or now_wall, record[3]
        else:
            acquire_time, transitions = now_wall, record[3] + 1
        lease.spec = c.V1LeaseSpec(holder_identity=o.identity, lease_duration_seconds=self._lease_seconds(),
                                   acquire_time=acquire_time, renew_time=now_wall, lease_transitions=transitions)
        try:
            await self._api.replace_namespaced_lease(o.lease_name, o.namespace, lease, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 409:  # 409: someone else updated it since we read it
                self._error("update", exc)
            return False
        except Exception as exc:
            self._error("update", exc)
            return False
        if holder != o.identity:
            log.info("acquired Lease %s/%s (previous holder %r)", o.namespace, o.lease_name, holder)
        self._observe((o.identity, now_wall, acquire_time, transitions))
        self.last_error = None
        return True

    def _observe(self, record: tuple) -> None:
        if record != self._observed:
            self._observed = record
            self._observed_at = self._clock()

    def _lease_seconds(self) -> int:
        return max(1, math.ceil(self.options.lease_duration_s))

    async def _release(self) -> None:
        o = self.options
        c = self._client
        lease = await self._api.read_namespaced_lease(o.lease_name, o.namespace)
        if lease.spec is None or lease.spec.holder_identity != o.identity:
            return
        now_wall = _micro_time()
        lease.spec = c.V1LeaseSpec(holder_identity="", lease_duration_seconds=1, acquire_time=now_wall,
                                   renew_time=now_wall, lease_transitions=lease.spec.lease_transitions or 0)
        await self._api.replace_namespaced_lease(o.lease_name, o.namespace, lease)
        log.info("released Lease %s/%s", o.namespace, o.lease_name)


def _status_message(exc: Exception) -> str:
    import json

    body = getattr(exc, "body", None)
    if body:
        try:
            return json.loads(body).get("message") or str(body)
        except (ValueError, AttributeError):
            return str(body)[:300]
    return str(getattr(exc, "reason", "") or exc)
