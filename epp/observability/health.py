"""gRPC health service on its own port, with the service names gateways and the reference chart probe."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# `liveness` is always SERVING while the process answers; the others only once the pool is known (and,
# with leader election, on the leader). `inference-extension` is what the reference chart probes.
READINESS_SERVICES = ("readiness", EXT_PROC_SERVICE, "", "inference-extension")


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready

    def status_of(self, service: str) -> int:
        if service == "liveness":
            return health_pb2.HealthCheckResponse.SERVING
        if service in READINESS_SERVICES:
            return health_pb2.HealthCheckResponse.SERVING if self._ready() else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    async def Check(self, request, context):  # noqa: N802 (gRPC method name)
        status = self.status_of(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not implemented; use Check")
