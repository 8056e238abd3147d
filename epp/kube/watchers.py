"""The Kubernetes source of the pool: the InferencePool named by `--pool-name`, the Pods its selector matches,
and the pool's InferenceObjectives and InferenceModels.

Each collection has its own Reflector (list + watch, see `epp.kube.reflector`) feeding an ObjectStore. Every
store change marks the pool dirty, and one recomputation per loop iteration turns (pool spec, pods) into
endpoints with `objects.endpoints_for` and hands them to `Pool.replace` (which keeps the Endpoint objects, and
so their metrics and in-flight counts, of endpoints that stay). Everything runs on the event loop.

* The pods are watched with the pool's selector as a `labelSelector`, so only the pool's pods cross the wire.
  When the pool's selector changes, the pod watch is restarted with the new selector (a full re-list), and
  meanwhile the pods already known are filtered by the new selector, so those leaving the pool leave at once.
  A change of targetPorts only recomputes.
* The pool is synced (and the EPP may report ready) once the InferencePool exists and its pods have been listed.
  If the InferencePool is deleted, the pool is emptied and no longer synced until it comes back.
* Standalone mode (`--endpoint-selector`, no CRDs): the spec comes from the flags and only pods are watched.
* InferenceObjective and InferenceModel CRDs are optional: while one is not installed, the EPP says so once and
  keeps retrying (with backoff), so installing it later takes effect without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from epp.datastore.models import ModelPolicy, ModelRule
from epp.datastore.pool import Pool
from epp.kube.client import collection_lister
from epp.kube.metrics import KubeMetrics
from epp.kube.objects import (
    MODELS,
    OBJECTIVES,
    PODS,
    V1_GROUP,
    ApiResource,
    PoolSpec,
    endpoints_for,
    name_of,
    oldest_first,
    parse_inference_model,
    parse_objective,
    parse_pool,
    pool_resource,
)
from epp.kube.reflector import Backoff, Reflector

log = logging.getLogger("epp.kube")


@dataclass(frozen=True)
class WatchOptions:
    namespace: str
    pool_name: str
    pool_group: str = V1_GROUP
    standalone: PoolSpec | None = None  # --endpoint-selector mode: this spec, no InferencePool
    watch_objectives: bool = True  # InferenceObjectives and InferenceModels of the pool (not in standalone mode)
    watch_timeout_s: float = 300.0  # server-side watch timeout, randomised up to 2x
    backoff_initial_s: float = 0.2
    backoff_cap_s: float = 30.0


class ObjectStore:
    """The current objects of one collection by name; tells `on_change` after every list or event."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self._on_change = on_change

    def replace(self, items: list[dict[str, Any]]) -> None:
        self.items = {name_of(o): o for o in items}
        self._on_change()

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "DELETED":
            self.items.pop(name_of(obj), None)
        else:
            self.items[name_of(obj)] = obj
        self._on_change()


class PoolWatcher:
    def __init__(self, api_client, pool: Pool, policy: ModelPolicy, options: WatchOptions,
                 metrics: KubeMetrics | None = None) -> None:
        self._api_client = api_client
        self.pool = pool
        self.policy = policy
        self.options = options
        self.metrics = metrics or KubeMetrics()
        self._pool_resource = pool_resource(options.pool_group)
        self._pool_store = ObjectStore(self._pool_changed)
        self._pod_store = ObjectStore(self._mark_dirty)
        self._objective_store = ObjectStore(self._policy_changed)
        self._model_store = ObjectStore(self._policy_changed)
        self.spec: PoolSpec | None = options.standalone
        self._pod_reflector: Reflector | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._dirty = False
        self._pool_error: str | None = None
        self._bad_objects: set[str] = set()
        self.reflectors: dict[str, Reflector] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        o = self.options
        if o.standalone is not None:
            log.info("standalone mode: pods in namespace %s with labels %s, ports %s", o.namespace,
                     o.standalone.selector_string(), ",".join(map(str, o.standalone.target_ports)))
            self._start_pods(o.standalone)
            return
        r = self._pool_resource
        self._run("pool", self._reflector(r, self._pool_store, field_selector=f"metadata.name={o.pool_name}"))
        if o.watch_objectives:
            self._run("objectives", self._reflector(
                OBJECTIVES, self._objective_store,
                optional="x-gateway-inference-objective headers give priority 0 until it is installed"))
            self._run("models", self._reflector(
                MODELS, self._model_store,
                optional="requests keep their model name and priority 0 until it is installed"))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("a Kubernetes watch task failed while stopping")

    @property
    def synced(self) -> bool:
        return self.pool.synced

    def status(self) -> str:
        """Why the pool is or is not synced, for logs and tests."""
        if self._pool_error:
            return self._pool_error
        for r in self.reflectors.values():
            if r.last_error and r.resource not in (OBJECTIVES, MODELS):
                return r.last_error
        if self.spec is None:
            return f"waiting for InferencePool {self.options.namespace}/{self.options.pool_name}"
        if not self.pool.synced:
            return "waiting for the pool's pods to be listed"
        return f"synced: {len(self.pool.endpoints)} endpoints"

    def _reflector(self, resource: ApiResource, store: ObjectStore, **kw) -> Reflector:
        o = self.options
        list_fn = collection_lister(self._api_client, resource, o.namespace)
        reflector = Reflector(resource, o.namespace, list_fn, store, watch_timeout_s=o.watch_timeout_s,
                              backoff=Backoff(o.backoff_initial_s, o.backoff_cap_s), on_error=self._count_error,
                              on_relist=self._count_relist, **kw)
        self.reflectors[resource.plural] = reflector
        return reflector

    def _run(self, key: str, reflector: Reflector) -> None:
        old = self._tasks.pop(key, None)
        if old is not None:
            old.cancel()
        self._tasks[key] = asyncio.get_running_loop().create_task(reflector.run(), name=f"kube-watch-{key}")

    def _count_error(self, reflector: Reflector, exc: Exception) -> None:
        self.metrics.api_errors.labels(reflector.resource.plural, str(getattr(exc, "status", 0))).inc()

    def _count_relist(self, reflector: Reflector, reason: str) -> None:
        self.metrics.relists.labels(reflector.resource.plural, reason).inc()

    # ------------------------------------------------------------------ pool and pods

    def _start_pods(self, spec: PoolSpec) -> None:
        self._pod_reflector = self._reflector(PODS, self._pod_store, label_selector=spec.selector_string())
        self._run("pods", self._pod_reflector)

    def _pool_changed(self) -> None:
        o = self.options
        obj = self._pool_store.items.get(o.pool_name)
        if obj is None:
            if self.spec is not None or self.pool.synced:
                log.warning("InferencePool %s/%s is gone: the pool is empty until it is created again",
                            o.namespace, o.pool_name)
            elif self._pool_error is None:
                log.warning("InferencePool %s/%s does not exist (%s): waiting for it to be created", o.namespace,
                            o.pool_name, self._pool_resource)
            self._pool_error = f"InferencePool {o.namespace}/{o.pool_name} not found ({self._pool_resource})"
            self._stop_pods()
            self.spec = None
            self.pool.replace([])
            self.pool.synced = False
            self.metrics.pool_synced.set(0)
            return
        try:
            spec = parse_pool(obj, self._pool_resource.api_version)
        except ValueError as exc:
            message = f"invalid InferencePool, keeping the last valid one: {exc}"
            if message != self._pool_error:
                log.error("%s", message)
            self._pool_error = message
            return
        self._pool_error = None
        old, self.spec = self.spec, spec
        if old != spec:
            log.info("InferencePool %s/%s: pods %s, target ports %s", o.namespace, o.pool_name,
                     spec.selector_string(), ",".join(map(str, spec.target_ports)))
        if old is None or old.selector != spec.selector:
            self._start_pods(spec)  # (re)lists the pods with the new selector
        self._mark_dirty()

    def _stop_pods(self) -> None:
        task = self._tasks.pop("pods", None)
        if task is not None:
            task.cancel()
        self._pod_reflector = None
        self._pod_store.items = {}

    def _mark_dirty(self) -> None:
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_soon(self._sync)

    def _sync(self) -> None:
        self._dirty = False
        spec = self.spec
        reflector = self._pod_reflector
        if spec is None or reflector is None or not (reflector.synced or self.pool.synced):
            return
        self.pool.replace(endpoints_for(self._pod_store.items.values(), spec))
        self.metrics.pool_synced.set(1)

    # ------------------------------------------------------------------ objectives and models

    def _policy_changed(self) -> None:
        o = self.options
        objectives: dict[str, int] = {}
        for obj in self._objective_store.items.values():
            parsed = self._parse(parse_objective, obj, o.pool_name, o.pool_group)
            if parsed is not None:
                objectives[parsed[0]] = parsed[1]
        rules: list[ModelRule] = []
        for obj in oldest_first(self._model_store.items.values()):
            rule = self._parse(parse_inference_model, obj, o.pool_name)
            if rule is not None:
                rules.append(rule)
        self.policy.set_objectives(objectives)
        self.policy.set_models(rules)

    def _parse(self, fn, obj, *args):
        try:
            return fn(obj, *args)
        except ValueError as exc:
            message = str(exc)
            if message not in self._bad_objects:
                self._bad_objects.add(message)
                log.error("ignoring %s", message)
            return None
