"""A small Kubernetes API server of the tests' own (aiohttp), enough for the real `kubernetes` client to list,
watch and hold Leases against it.

What it implements, with the API server's semantics:

* Collections `/api/v1/namespaces/{ns}/{plural}` and `/apis/{group}/{version}/namespaces/{ns}/{plural}` (pods,
  leases, and every CRD installed with `install_crd`); objects `/…/{plural}/{name}`.
* list with `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`) and `fieldSelector` (`metadata.name`,
  `metadata.namespace`), answering the collection's `resourceVersion`.
* watch (`watch=true`): a chunked stream of JSON lines. From a `resourceVersion` it replays what happened
  since; without one it starts with synthetic ADDED events. ADDED/MODIFIED/DELETED follow writes; with a
  label selector, an object that stops matching arrives as DELETED and one that starts matching as ADDED.
  `allowWatchBookmarks` enables BOOKMARK events (sent by `send_bookmarks`). `timeoutSeconds` ends the stream
  cleanly. A resourceVersion older than the last compaction gets an ERROR event with code 410 (Expired).
* get / create / update (PUT) with optimistic concurrency: an update whose `metadata.resourceVersion` is not
  the current one gets 409 Conflict; a create of an existing name gets 409 AlreadyExists; a missing object
  404 NotFound (a `Status`).
* A collection whose CRD is not installed answers `404 page not found` (text), as the real server does.
* `forbid(verb, plural)` makes those calls 403 Forbidden with the RBAC message; a request without the
  kubeconfig's bearer token gets 401.

Test controls: `apply`/`delete` write objects (and notify watches); `silently()` makes writes that no watch
hears (events lost, as when a watch falls behind a compaction); `expire_watches()` compacts the history and
breaks every open watch with a 410 ERROR; `requests` records every call (method, path, query).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

from epp.kube.objects import LEASES, PODS, ApiResource

Key = tuple[str, str, str]  # (group, version, plural)
_CLOSE = object()


def _key(r: ApiResource) -> Key:
    return (r.group, r.version, r.plural)


def _status(code: int, reason: str, message: str, **details: Any) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return web.Response(status=code, body=orjson.dumps(body), content_type="application/json")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_label_selector(text: str | None) -> list[tuple[str, str, str | None]]:
    """(key, op, value) terms; op one of = != exists !exists."""
    terms: list[tuple[str, str, str | None]] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "!=" in part:
            k, v = part.split("!=", 1)
            terms.append((k.strip(), "!=", v.strip()))
        elif "=" in part:
            k, v = part.split("=", 1)
            terms.append((k.strip(), "=", v.lstrip("=").strip()))
        elif part.startswith("!"):
            terms.append((part[1:].strip(), "!exists", None))
        elif " " in part:
            raise ValueError(f"unsupported label selector {part!r}")
        else:
            terms.append((part, "exists", None))
    return terms


def labels_match(labels: dict[str, str], terms: list[tuple[str, str, str | None]]) -> bool:
    for k, op, v in terms:
        if op == "=" and labels.get(k) != v:
            return False
        if op == "!=" and labels.get(k) == v:
            return False
        if op == "exists" and k not in labels:
            return False
        if op == "!exists" and k in labels:
            return False
    return True


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    terms = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        neg = "!=" in part
        k, v = part.split("!=" if neg else "=", 1)
        k, v = k.strip(), v.lstrip("=").strip()
        if k not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"field label not supported: {k}")
        terms.append((k, neg, v))
    return terms


def fields_match(obj: dict, terms: list[tuple[str, bool, str]]) -> bool:
    meta = obj.get("metadata") or {}
    for k, neg, v in terms:
        actual = meta.get(k.split(".", 1)[1], "")
        if (actual == v) == neg:
            return False
    return True


@dataclass
class _Watch:
    key: Key
    namespace: str
    labels: list
    fields: list
    bookmarks: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        return (meta.get("namespace") == self.namespace and labels_match(meta.get("labels") or {}, self.labels)
                and fields_match(obj, self.fields))

    def translate(self, kind: str, obj: dict, old: dict | None) -> tuple[str, dict] | None:
        """The event this watch sees for a write, given its selectors (None: it sees nothing)."""
        now, before = self.matches(obj), self.matches(old)
        if kind == "DELETED":
            return ("DELETED", obj) if before else None
        if now and not before:
            return ("ADDED", obj)
        if before and not now:
            return ("DELETED", obj)
        if now:
            return (kind, obj)
        return None


class FakeKubeAPI:
    def __init__(self, host: str = "127.0.0.121", token: str = "fake-token") -> None:
        self.host = host
        self.token = token
        self._rv = 1000
        self._compacted = 0  # watches from a resourceVersion below this get 410
        self._kinds: dict[Key, ApiResource] = {_key(PODS): PODS, _key(LEASES): LEASES}
        self._objects: dict[Key, dict[tuple[str, str], dict]] = {}
        self._history: dict[Key, list[tuple[int, str, dict, dict | None]]] = {}
        self._watches: list[_Watch] = []
        self._silent = False
        self.forbidden: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FakeKubeAPI:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for w in self._watches:
            w.queue.put_nowait(_CLOSE)
        if self._runner is not None:
            await self._runner.cleanup()

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }))
        return path

    # ------------------------------------------------------------------ test controls

    def install_crd(self, resource: ApiResource) -> None:
        self._kinds[_key(resource)] = resource

    def uninstall_crd(self, resource: ApiResource) -> None:
        self._kinds.pop(_key(resource), None)

    def forbid(self, verb: str, resource: ApiResource) -> None:
        self.forbidden.add((verb, resource.plural))

    def allow(self, verb: str, resource: ApiResource) -> None:
        self.forbidden.discard((verb, resource.plural))

    @contextlib.contextmanager
    def silently(self) -> Iterator[None]:
        """Writes inside are not heard by any watch, now or on a resume (as events lost to a compaction)."""
        self._silent = True
        try:
            yield
        finally:
            self._silent = False

    def expire_watches(self) -> None:
        """Compact the history (every earlier resourceVersion is now too old) and break every open watch
        with an ERROR 410 event, as an API server does when a watcher fell too far behind."""
        self._compacted = self._rv
        for h in self._history.values():
            h.clear()
        for w in list(self._watches):
            w.queue.put_nowait(("ERROR", self._expired(w)))
            w.queue.put_nowait(_CLOSE)

    def send_bookmarks(self) -> None:
        for w in self._watches:
            if w.bookmarks:
                kind = self._kinds.get(w.key)
                w.queue.put_nowait(("BOOKMARK", {"kind": kind.kind if kind else "", "apiVersion":
                                                 kind.api_version if kind else "",
                                                 "metadata": {"resourceVersion": str(self._rv)}}))

    def open_watches(self, resource: ApiResource) -> int:
        return sum(1 for w in self._watches if w.key == _key(resource))

    def calls(self, verb: str, resource: ApiResource) -> list[dict[str, str]]:
        """The queries of the list (verb "list") or watch ("watch") calls made on a collection."""
        path_end = f"/{resource.plural}"
        out = []
        for method, path, query in self.requests:
            if method != "GET" or not path.endswith(path_end):
                continue
            is_watch = query.get("watch") in ("true", "1")
            if (verb == "watch") == is_watch:
                out.append(query)
        return out

    def apply(self, resource: ApiResource, obj: dict) -> dict:
        """Create or replace an object (bumping its resourceVersion) and tell the watches."""
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace", "default"), meta["name"]
        store = self._objects.setdefault(_key(resource), {})
        old = store.get((ns, name))
        return self._write(resource, obj, "MODIFIED" if old is not None else "ADDED")

    def delete(self, resource: ApiResource, name: str, namespace: str = "default") -> None:
        store = self._objects.setdefault(_key(resource), {})
        old = store.pop((namespace, name))
        self._rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._emit(_key(resource), "DELETED", gone, old)

    def get(self, resource: ApiResource, name: str, namespace: str = "default") -> dict | None:
        return self._objects.get(_key(resource), {}).get((namespace, name))

    def objects(self, resource: ApiResource) -> list[dict]:
        return list(self._objects.get(_key(resource), {}).values())

    # ------------------------------------------------------------------ builders

    @staticmethod
    def pod(name: str, ip: str, labels: dict[str, str], *, ready: bool = True, namespace: str = "default",
            annotations: dict[str, str] | None = None, deleting: bool = False) -> dict:
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
        if annotations:
            meta["annotations"] = dict(annotations)
        if deleting:
            meta["deletionTimestamp"] = _now()
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "vllm"}]},
                "status": {"phase": "Running", "podIP": ip,
                           "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}

    @staticmethod
    def inference_pool(name: str, selector: dict[str, str], ports: list[int], namespace: str = "default",
                       api_version: str = "inference.networking.k8s.io/v1") -> dict:
        if api_version.endswith("v1alpha2"):
            spec: dict[str, Any] = {"selector": dict(selector), "targetPortNumber": ports[0],
                                    "extensionRef": {"name": f"{name}-epp"}}
        else:
            spec = {"selector": {"matchLabels": dict(selector)}, "targetPorts": [{"number": p} for p in ports],
                    "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}}}
        return {"apiVersion": api_version, "kind": "InferencePool",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}

    # ------------------------------------------------------------------ storage

    def _write(self, resource: ApiResource, obj: dict, kind: str) -> dict:
        self._rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", resource.api_version)
        obj.setdefault("kind", resource.kind)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        store = self._objects.setdefault(_key(resource), {})
        old = store.get((meta["namespace"], meta["name"]))
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        else:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(self._rv)
        store[(meta["namespace"], meta["name"])] = obj
        self._emit(_key(resource), kind, obj, old)
        return obj

    def _emit(self, key: Key, kind: str, obj: dict, old: dict | None) -> None:
        if self._silent:
            return
        self._history.setdefault(key, []).append((self._rv, kind, obj, old))
        for w in self._watches:
            if w.key == key:
                ev = w.translate(kind, obj, old)
                if ev is not None:
                    w.queue.put_nowait(ev)

    def _expired(self, w: _Watch) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"too old resource version: {self._compacted - 1} ({self._compacted})", "reason": "Expired",
                "code": 410}

    # ------------------------------------------------------------------ HTTP

    def _route(self, path: str) -> tuple[Key, str, str | None] | None:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 5 and parts[0] == "api" and parts[2] == "namespaces":
            group, version, rest = "", parts[1], parts[3:]
        elif len(parts) >= 6 and parts[0] == "apis" and parts[3] == "namespaces":
            group, version, rest = parts[1], parts[2], parts[4:]
        else:
            return None
        if len(rest) not in (2, 3):
            return None
        return (group, version, rest[1]), rest[0], rest[2] if len(rest) == 3 else None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.method, request.path, query))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        route = self._route(request.path)
        if route is None or route[0] not in self._kinds:
            return web.Response(status=404, text="404 page not found\n")
        key, ns, name = route
        resource = self._kinds[key]
        watch = query.get("watch") in ("true", "1")
        verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create", "PUT": "update",
                "DELETE": "delete"}.get(request.method, request.method.lower())
        if (verb, resource.plural) in self.forbidden:
            group = resource.group
            return _status(403, "Forbidden",
                           f'{resource.plural}{"." + group if group else ""} is forbidden: User '
                           f'"system:serviceaccount:{ns}:epp" cannot {verb} resource "{resource.plural}" in API '
                           f'group "{group}" in the namespace "{ns}"', kind=resource.plural)
        try:
            if verb == "list":
                return self._list(resource, ns, query)
            if verb == "watch":
                return await self._watch(request, resource, ns, query)
            if verb == "get":
                obj = self.get(resource, name, ns)
                if obj is None:
                    return self._not_found(resource, name)
                return web.Response(body=orjson.dumps(obj), content_type="application/json")
            if verb == "create":
                return self._create(resource, ns, orjson.loads(await request.read()))
            if verb == "update":
                return self._update(resource, ns, name, orjson.loads(await request.read()))
            if verb == "delete":
                if self.get(resource, name, ns) is None:
                    return self._not_found(resource, name)
                self.delete(resource, name, ns)
                return _status(200, "", "deleted")
        except ValueError as exc:
            return _status(400, "BadRequest", str(exc))
        return _status(405, "MethodNotAllowed", f"{request.method} is not supported here")

    @staticmethod
    def _qualified(resource: ApiResource) -> str:
        return f"{resource.plural}.{resource.group}" if resource.group else resource.plural

    def _not_found(self, resource: ApiResource, name: str) -> web.Response:
        return _status(404, "NotFound", f'{self._qualified(resource)} "{name}" not found', name=name,
                       kind=resource.plural)

    def _select(self, resource: ApiResource, ns: str, query: dict[str, str]) -> tuple[list, list]:
        return parse_label_selector(query.get("labelSelector")), parse_field_selector(query.get("fieldSelector"))

    def _list(self, resource: ApiResource, ns: str, query: dict[str, str]) -> web.Response:
        labels, fields = self._select(resource, ns, query)
        w = _Watch(_key(resource), ns, labels, fields, False)
        items = [o for o in self.objects(resource) if w.matches(o)]
        body = {"kind": f"{resource.kind}List", "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _watch(self, request: web.Request, resource: ApiResource, ns: str,
                     query: dict[str, str]) -> web.StreamResponse:
        labels, fields = self._select(resource, ns, query)
        w = _Watch(_key(resource), ns, labels, fields, query.get("allowWatchBookmarks") in ("true", "1"))
        rv_text = query.get("resourceVersion") or "0"
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        rv = int(rv_text)
        if rv != 0 and rv < self._compacted:
            await resp.write(orjson.dumps({"type": "ERROR", "object": self._expired(w)}) + b"\n")
            await resp.write_eof()
            return resp
        if rv == 0:  # start with the current state
            for obj in self.objects(resource):
                if w.matches(obj):
                    w.queue.put_nowait(("ADDED", obj))
        else:
            for ev_rv, kind, obj, old in self._history.get(w.key, []):
                if ev_rv > rv:
                    ev = w.translate(kind, obj, old)
                    if ev is not None:
                        w.queue.put_nowait(ev)
        self._watches.append(w)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(query.get("timeoutSeconds") or 1800)
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(w.queue.get(), remaining)
                except TimeoutError:
                    break
                if item is _CLOSE:
                    break
                kind, obj = item
                await resp.write(orjson.dumps({"type": kind, "object": obj}) + b"\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watches.remove(w)
        return resp

    def _create(self, resource: ApiResource, ns: str, body: dict) -> web.Response:
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", ns)
        name = meta.get("name")
        if not name:
            return _status(422, "Invalid", "metadata.name: Required value")
        if self.get(resource, name, ns) is not None:
            return _status(409, "AlreadyExists", f'{self._qualified(resource)} "{name}" already exists', name=name)
        meta.pop("resourceVersion", None)
        obj = self._write(resource, body, "ADDED")
        return web.Response(status=201, body=orjson.dumps(obj), content_type="application/json")

    def _update(self, resource: ApiResource, ns: str, name: str, body: dict) -> web.Response:
        current = self.get(resource, name, ns)
        if current is None:
            return self._not_found(resource, name)
        meta = body.setdefault("metadata", {})
        meta["namespace"], meta["name"] = ns, name
        sent = meta.get("resourceVersion")
        if sent and sent != current["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", f'Operation cannot be fulfilled on {self._qualified(resource)} '
                                            f'"{name}": the object has been modified; please apply your changes '
                                            f'to the latest version and try again', name=name)
        obj = self._write(resource, body, "MODIFIED")
        return web.Response(body=orjson.dumps(obj), content_type="application/json")
