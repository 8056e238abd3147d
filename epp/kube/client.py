"""Connecting to the Kubernetes API, and turning its failures into messages that say what to do.

The client is the official `kubernetes` package's asyncio flavour (`kubernetes.aio`, aiohttp underneath):
list, watch and Lease calls run on the EPP's event loop as coroutines, so every change they bring is applied
to the pool on the loop without threads or hand-offs, and stopping a watch is cancelling its task (the
connection closes at once). The synchronous client would need one blocked thread per watch, plus socket
shutdowns from another thread to stop them.

Where the configuration comes from, in controller-runtime's order: `--kubeconfig`, else `$KUBECONFIG`, else
the in-cluster service account (when `KUBERNETES_SERVICE_HOST` is set), else `~/.kube/config`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from epp.kube.objects import ApiResource

RBAC_HINT = ("grant the EPP's service account get/list/watch on pods and on the inference.networking CRDs, and "
             "get/create/update on leases.coordination.k8s.io for leader election (the Role in manifests/ and "
             "the Helm chart has them)")


class KubeConfigError(RuntimeError):
    """No usable cluster configuration."""


def locate_config(kubeconfig: str | None = None) -> str | None:
    """Where the cluster configuration comes from: a kubeconfig path, or None for the in-cluster service
    account. Raises KubeConfigError, saying what to do, when there is none."""
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    if path:
        if not Path(path).is_file():
            raise KubeConfigError(f"kubeconfig {path} does not exist: pass --kubeconfig PATH or set KUBECONFIG")
        return path
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    home = Path.home() / ".kube" / "config"
    if home.is_file():
        return str(home)
    raise KubeConfigError(
        "found no cluster configuration: not running in a pod (KUBERNETES_SERVICE_HOST unset), no --kubeconfig, "
        "no $KUBECONFIG and no ~/.kube/config. Pass --kubeconfig PATH, or use --endpoints host:port,... for a "
        "static pool")


async def connect(kubeconfig: str | None = None, context: str | None = None):
    """An ApiClient for the cluster (see the module docstring for where its configuration comes from)."""
    from kubernetes.aio import client, config

    path = locate_config(kubeconfig)
    cfg = client.Configuration()
    try:
        if path is not None:
            await config.load_kube_config(config_file=path, context=context, client_configuration=cfg,
                                          persist_config=False)
        else:
            config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException as exc:
        raise KubeConfigError(f"cannot load the Kubernetes configuration from {path or 'the pod'}: {exc}") from None
    return client.ApiClient(configuration=cfg)


_QUERY_NAMES = {"label_selector": "labelSelector", "field_selector": "fieldSelector",
                "resource_version": "resourceVersion", "allow_watch_bookmarks": "allowWatchBookmarks",
                "timeout_seconds": "timeoutSeconds", "watch": "watch"}


def collection_lister(api_client, resource: ApiResource, namespace: str):
    """A function listing (or, with watch=True, watching) one namespaced collection, answering the raw
    aiohttp response (status unchecked, body unread).

    It goes through the ApiClient's own request path (`param_serialize` + `call_api`: authentication, TLS,
    the base URL), which is what the generated `CoreV1Api.list_namespaced_pod` and
    `CustomObjectsApi.list_namespaced_custom_object` do for these two URL shapes; importing the generated
    CoreV1Api module alone costs 1.5 s of CPU, which an EPP starting up (or failing over) should not pay."""
    path = resource.collection_path(namespace)

    async def call(_request_timeout: float | None = None, **query: Any):
        params = []
        for key, value in query.items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            params.append((_QUERY_NAMES[key], value))
        serialized = await api_client.param_serialize(
            method="GET", resource_path=path, query_params=params,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        response = await api_client.call_api(*serialized, _request_timeout=_request_timeout,
                                             _preload_content=False)
        return response.response

    return call


@dataclass(eq=False)
class KubeApiError(Exception):
    """A call to the API server failed with an HTTP status (or, status 0, did not get an answer)."""

    status: int
    verb: str
    resource: ApiResource
    namespace: str
    reason: str = ""
    detail: str = ""  # the API server's message, or the transport error

    def __post_init__(self) -> None:
        super().__init__(self.explain())

    def __str__(self) -> str:
        return self.explain()

    @property
    def crd_missing(self) -> bool:
        """A 404 for a whole collection of a custom resource: its CRD is not installed (the API server then
        answers `404 page not found`, not a Status with reason NotFound)."""
        return self.status == 404 and bool(self.resource.group) and self.reason != "NotFound"

    def explain(self) -> str:
        where = f"{self.verb} {self.resource} in namespace {self.namespace!r}"
        if self.status == 0:
            return (f"cannot reach the Kubernetes API server ({where}): {self.detail}. Check --kubeconfig / "
                    f"$KUBECONFIG, or the pod's network to the API server")
        if self.crd_missing:
            return (f"the {self.resource.kind} CRD ({self.resource}) is not installed in the cluster "
                    f"(404 on {where}). Install the Gateway API Inference Extension CRDs "
                    f"(kubectl apply -f manifests/crds/){self._crd_hint()}")
        if self.status == 403:
            return (f"RBAC forbids {where} (403: {self.detail or self.reason}). To fix it, {RBAC_HINT}")
        if self.status == 401:
            return (f"the API server refused our credentials (401 on {where}): the token or client certificate "
                    f"in the kubeconfig / service account is invalid or expired")
        return f"{where} failed: HTTP {self.status} {self.reason}: {self.detail}".rstrip(": ")

    def _crd_hint(self) -> str:
        if self.resource.kind == "InferencePool":
            other = "inference.networking.x-k8s.io" if self.resource.version == "v1" else \
                "inference.networking.k8s.io"
            return (f", or pass --pool-group {other} if the cluster has that version, or run without CRDs "
                    f"with --endpoint-selector key=value")
        return ""


def api_error_from(status: int, body: bytes, verb: str, resource: ApiResource, namespace: str) -> KubeApiError:
    """A KubeApiError from a response: the API server answers errors with a `Status` object; anything else
    (e.g. `404 page not found`) is kept as text."""
    reason, detail = "", body.decode("utf-8", "replace").strip()[:500]
    try:
        status_obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        status_obj = None
    if isinstance(status_obj, dict) and status_obj.get("kind") == "Status":
        reason = status_obj.get("reason") or ""
        detail = status_obj.get("message") or detail
    return KubeApiError(status, verb, resource, namespace, reason, detail)
