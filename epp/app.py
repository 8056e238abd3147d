"""Wiring: pool + config + director + servers (ext_proc, health, metrics) + scraper, on one event loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2_grpc

from epp.config import EppConfig
from epp.datalayer.scraper import Scraper
from epp.datalayer.worker import ScrapeWorker
from epp.datastore.models import ModelPolicy
from epp.datastore.pool import Pool
from epp.director import Director, DirectorOptions
from epp.extproc.grpc_server import ext_proc_handler
from epp.extproc.h2 import H2Server, server_ssl_context
from epp.extproc.protocol import ReplyCache
from epp.extproc.session import ExtProcSession
from epp.extproc.tls import server_credentials
from epp.observability.health import HealthServicer
from epp.observability.metrics import EppMetrics
from epp.scheduling.interfaces import Lifecycle

log = logging.getLogger("epp")


@dataclass
class ServeOptions:
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    secure_serving: bool = True
    cert_path: str | None = None
    max_request_body_bytes: int = 64 << 20
    disable_subset_filter: bool = False
    objectives: dict[str, int] = field(default_factory=dict)
    metrics_staleness_s: float = 2.0
    transport: str = "fast"  # ext_proc transport: "fast" (epp/extproc/h2), or "grpcio"
    metrics_scraper: str = "inline"  # "inline", or "worker": scrape in a child process (epp/datalayer/worker.py)
    log_level: str = "info"  # for the scrape worker process
    log_format: str = "text"


class EppApp:
    """The EPP process. `policy` gives requests their priority and target model (objectives and
    InferenceModels; default: `options.objectives`). With `kube` (KubeOptions) the pool and the policy are fed
    by the Kubernetes watchers, and readiness follows their sync and, with leader election, the Lease;
    `kube_client` is an ApiClient to use instead of connecting with the options' kubeconfig."""

    def __init__(self, config: EppConfig, pool: Pool, options: ServeOptions, policy: ModelPolicy | None = None,
                 kube=None, kube_client=None) -> None:
        self.config = config
        self.pool = pool
        self.options = options
        self.policy = policy if policy is not None else ModelPolicy(options.objectives)
        self.metrics = EppMetrics(pool, staleness_s=options.metrics_staleness_s)
        self.metrics.add_plugin_collectors(config.plugins.values())
        self.kube = None
        if kube is not None:
            from epp.kube.runtime import KubeRuntime

            self.kube = KubeRuntime(pool, self.policy, kube, self.metrics.registry, api_client=kube_client)
        self._lifecycle = [p for p in config.plugins.values() if isinstance(p, Lifecycle)]
        self.director = Director(config, pool, self.metrics,
                                 options=DirectorOptions(disable_subset_filter=options.disable_subset_filter),
                                 policy=self.policy)
        self.replies = ReplyCache()
        if options.metrics_scraper == "worker":
            self.scraper: Scraper | ScrapeWorker = ScrapeWorker(
                pool, config.data_sources, on_error=self._scrape_error, log_level=options.log_level,
                log_format=options.log_format)
        elif options.metrics_scraper == "inline":
            self.scraper = Scraper(pool, config.data_sources, on_success=None, on_error=self._scrape_error)
        else:
            raise ValueError(f"unknown metrics scraper {options.metrics_scraper!r}: use 'worker' or 'inline'")
        self._grpc: grpc.aio.Server | None = None
        self._h2: H2Server | None = None
        self._health: grpc.aio.Server | None = None
        self._web: web.AppRunner | None = None
        self.ports: dict[str, int] = {}

    def _scrape_error(self, endpoint, exc) -> None:
        self.metrics.scrape_errors.labels(endpoint.name).inc()

    def ready(self) -> bool:
        """Readiness (the gRPC health service): a static pool once it has endpoints; in Kubernetes mode, as the
        reference, once the InferencePool and its pods are synced and, with leader election, on the leader."""
        if self.kube is not None:
            return self.kube.ready()
        return self.pool.synced and bool(self.pool.endpoints)

    def new_session(self) -> ExtProcSession:
        return ExtProcSession(self.director, self.options.max_request_body_bytes, self.replies)

    async def start(self) -> None:
        o = self.options
        addr = o.host if ":" not in o.host else f"[{o.host}]"
        if o.transport == "fast":
            self._h2 = H2Server(self.new_session,
                                ssl_context=server_ssl_context(o.cert_path) if o.secure_serving else None)
        elif o.transport == "grpcio":
            self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                                  ("grpc.max_receive_message_length", 8 << 20)])
            self._grpc.add_generic_rpc_handlers([ext_proc_handler(self.new_session)])
            if o.secure_serving:
                self.ports["grpc"] = self._grpc.add_secure_port(f"{addr}:{o.grpc_port}",
                                                                server_credentials(o.cert_path))
            else:
                self.ports["grpc"] = self._grpc.add_insecure_port(f"{addr}:{o.grpc_port}")
        else:
            raise ValueError(f"unknown ext_proc transport {o.transport!r}: use 'fast' or 'grpcio'")
        self._health = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(self.ready), self._health)
        self.ports["health"] = self._health.add_insecure_port(f"{addr}:{o.grpc_health_port}")
        for name, port in self.ports.items():
            if port == 0:
                raise OSError(f"could not bind the {name} port on {o.host}; is another process using it?")
        if self._h2 is not None:
            try:
                self.ports["grpc"] = await self._h2.start(o.host, o.grpc_port)
            except OSError as exc:
                raise OSError(f"could not bind the grpc port {o.grpc_port} on {o.host} ({exc.strerror}); is "
                              f"another process using it?") from None
        else:
            await self._grpc.start()
        await self._health.start()
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        self._web = web.AppRunner(app, access_log=None)
        await self._web.setup()
        site = web.TCPSite(self._web, o.host, o.metrics_port, reuse_address=True)
        await site.start()
        self.ports["metrics"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        await self.scraper.start()
        for plugin in self._lifecycle:
            await plugin.start()
        if self.kube is not None:
            try:
                await self.kube.start()
            except Exception:
                await self.stop(0)
                raise
        log.info("epp serving ext_proc on %s:%d (%s, %s transport), health on %d, metrics on %d; pool %s with %d "
                 "endpoints; config from %s", o.host, self.ports["grpc"], "TLS" if o.secure_serving else "plaintext",
                 o.transport, self.ports["health"], self.ports["metrics"], self.pool.name,
                 len(self.pool.endpoints), self.config.source)

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def stop(self, grace: float = 1.0) -> None:
        if self.kube is not None:  # first: a leader releases its Lease, so that a standby takes over at once
            try:
                await self.kube.stop()
            except Exception:
                log.exception("stopping the Kubernetes watchers failed")
        for plugin in reversed(self._lifecycle):
            try:
                await plugin.stop()
            except Exception:
                log.exception("stopping plugin %s failed", getattr(plugin, "name", plugin))
        await self.scraper.stop()
        if self._h2 is not None:
            await self._h2.stop(grace)
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._health is not None:
            await self._health.stop(0)
        if self._web is not None:
            await self._web.cleanup()
