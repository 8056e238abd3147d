"""The ext_proc transport on grpcio's asyncio server. The seam is narrow on purpose: a stream of
ProcessingRequest in, ProcessingResponse out, through ExtProcSession. A faster transport replaces this
module only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc

from epp.extproc import protocol as p
from epp.extproc.session import ExtProcSession

log = logging.getLogger("epp.extproc")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def ext_proc_handler(new_session: Callable[[], ExtProcSession]) -> grpc.GenericRpcHandler:
    async def process(requests: AsyncIterator[p.ProcessingRequest], context: grpc.aio.ServicerContext):
        session = new_session()
        try:
            async for msg in requests:
                for resp in session.handle(msg):
                    yield resp
        finally:
            session.close()

    handler = grpc.stream_stream_rpc_method_handler(
        process,
        request_deserializer=p.ProcessingRequest.FromString,
        response_serializer=p.serialize,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"Process": handler})
