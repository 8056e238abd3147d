"""A purpose-built ext_proc transport: HTTP/2 and gRPC framing for exactly one method,
`/envoy.service.ext_proc.v3.ExternalProcessor/Process`, written for Envoy as the client.

Why: grpcio's transport costs ~0.9 ms of CPU per ext_proc request and caps one process near 1,300 req/s;
HTTP/2 written for this one peer and one method costs a fraction of that (see /work/shared/performance.md
and issue #8). The seam is the same as grpcio's (`ExtProcSession.handle(msg) -> replies`, `close()`).

- frames.py: frame and header-block encoding, gRPC framing, grpc-timeout;
- connection.py: one connection as an asyncio Protocol (flow control, streams, shutdown);
- server.py: the listening socket, TLS with ALPN h2, graceful stop.
"""

from epp.extproc.h2.connection import H2Config, H2Connection
from epp.extproc.h2.server import H2Server, server_ssl_context

__all__ = ["H2Config", "H2Connection", "H2Server", "server_ssl_context"]
