"""List-then-watch of one Kubernetes collection, as client-go's reflector does it, on the event loop.

1. **List** the collection (optionally narrowed by label and field selectors); hand every object to the
   handler at once (`replace`), and remember the list's `resourceVersion`.
2. **Watch** from that resourceVersion with bookmarks on. Each ADDED/MODIFIED/DELETED goes to the handler
   (`event`); every event and BOOKMARK advances the remembered resourceVersion. The server ends a watch after
   `timeoutSeconds` (randomised between 1× and 2× `watch_timeout_s`, as client-go spreads them); the next
   watch resumes from the remembered version, without a new list.
3. **410 Gone** (the version was compacted away: an ERROR event with code 410, or an HTTP 410) means events
   were lost: list again at once. Any other failure (an HTTP error, a broken connection) waits an exponential
   backoff with jitter (0.2 s doubling up to 30 s) and lists again.

Failures are logged once per distinct message (and when they clear), counted in a metric, and kept in
`last_error` for readiness messages and tests. Objects are the API's JSON as dicts: nothing is converted to
typed models, which would cost more than everything the EPP does with them.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import orjson

from epp.kube.client import KubeApiError, api_error_from
from epp.kube.objects import ApiResource

log = logging.getLogger("epp.kube")

ListFn = Callable[..., Awaitable[aiohttp.ClientResponse]]


class Handler(Protocol):
    def replace(self, items: list[dict[str, Any]]) -> None: ...

    def event(self, kind: str, obj: dict[str, Any]) -> None: ...


class Backoff:
    """Exponential backoff with full jitter in [d/2, d], reset after a success."""

    def __init__(self, initial: float = 0.2, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self._next = initial
        self._rng = rng or random.Random()

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * (0.5 + self._rng.random() / 2)

    def reset(self) -> None:
        self._next = self.initial


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class Reflector:
    def __init__(
        self,
        resource: ApiResource,
        namespace: str,
        list_fn: ListFn,
        handler: Handler,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        watch_timeout_s: float = 300.0,
        backoff: Backoff | None = None,
        on_error: Callable[[Reflector, Exception], None] | None = None,
        on_relist: Callable[[Reflector, str], None] | None = None,
        rng: random.Random | None = None,
        optional: str | None = None,
    ) -> None:
        """`optional`: for a CRD the EPP can do without, what is lost while it is missing; a missing CRD is
        then reported at info level with that note, instead of as a warning."""
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.watch_timeout_s = watch_timeout_s
        self._list_fn = list_fn
        self._handler = handler
        self._backoff = backoff or Backoff()
        self._on_error = on_error
        self._on_relist = on_relist
        self._rng = rng or random.Random()
        self._optional = optional
        self.resource_version: str | None = None
        self.synced = False  # a list has been delivered at least once
        self.last_error: str | None = None
        self.lists = 0  # how many lists were made (for metrics and tests)

    def __repr__(self) -> str:
        sel = f" labels={self.label_selector}" if self.label_selector else ""
        sel += f" fields={self.field_selector}" if self.field_selector else ""
        return f"Reflector({self.resource} in {self.namespace}{sel})"

    def _query(self) -> dict[str, Any]:
        q: dict[str, Any] = {}
        if self.label_selector:
            q["label_selector"] = self.label_selector
        if self.field_selector:
            q["field_selector"] = self.field_selector
        return q

    async def run(self) -> None:
        """List and watch until cancelled."""
        reason = "start"
        while True:
            try:
                if self._on_relist is not None and reason != "start":
                    self._on_relist(self, reason)
                await self._list()
                self._cleared()
                while True:
                    await self._watch()
            except asyncio.CancelledError:
                raise
            except Gone:
                log.info("%s: watch expired (410 Gone); listing again", self)
                reason = "gone"
                continue
            except KubeApiError as exc:
                if self._optional and exc.crd_missing:
                    self._failed(exc, f"{exc.explain()}. It is optional: {self._optional}", logging.INFO)
                else:
                    self._failed(exc, exc.explain())
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                err = KubeApiError(0, "watch", self.resource, self.namespace, detail=f"{type(exc).__name__}: {exc}")
                self._failed(err, err.explain())
            except Exception as exc:  # a bug in a handler must not end the watch for good
                log.exception("%s: handling an object failed; listing again", self)
                self._failed(exc, f"{self}: {type(exc).__name__}: {exc}")
            reason = "error"
            await asyncio.sleep(self._backoff.next())

    def _failed(self, exc: Exception, message: str, level: int = logging.WARNING) -> None:
        if message != self.last_error:
            log.log(level, "%s", message)
        else:
            log.debug("%s (again)", message)
        self.last_error = message
        if self._on_error is not None:
            self._on_error(self, exc)

    def _cleared(self) -> None:
        self._backoff.reset()
        if self.last_error is not None:
            log.info("%s: listed again after an error; watching", self)
            self.last_error = None

    async def _list(self) -> None:
        resp = await self._list_fn(**self._query(), _request_timeout=60.0)
        try:
            body = await resp.read()
            if resp.status != 200:
                raise api_error_from(resp.status, body, "list", self.resource, self.namespace)
        finally:
            resp.release()
        data = orjson.loads(body)
        self.lists += 1
        self.resource_version = (data.get("metadata") or {}).get("resourceVersion") or None
        self._handler.replace(list(data.get("items") or ()))
        self.synced = True

    async def _watch(self) -> None:
        timeout = max(1, int(self.watch_timeout_s * (1 + self._rng.random())))
        kwargs = self._query()
        if self.resource_version:
            kwargs["resource_version"] = self.resource_version
        resp = await self._list_fn(**kwargs, watch=True, allow_watch_bookmarks=True, timeout_seconds=timeout,
                                   _request_timeout=float(timeout + 30))
        try:
            if resp.status == 410:
                raise Gone()
            if resp.status != 200:
                raise api_error_from(resp.status, await resp.read(), "watch", self.resource, self.namespace)
            async for line in resp.content:
                if line.strip():
                    self._event(orjson.loads(line))
        finally:
            resp.close()

    def _event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        obj = ev.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone()
            raise KubeApiError(int(code or 500), "watch", self.resource, self.namespace, obj.get("reason") or "",
                               obj.get("message") or "")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._handler.event(kind, obj)
        elif kind != "BOOKMARK":
            log.debug("%s: ignoring watch event of type %r", self, kind)
            return
        if rv:
            self.resource_version = rv
