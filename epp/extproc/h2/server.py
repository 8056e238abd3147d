"""The listening side of the purpose-built ext_proc transport: accepts connections (cleartext HTTP/2 with
prior knowledge, or TLS offering ALPN `h2`), tracks them, and stops gracefully.

Stop: the socket stops accepting, every connection sends GOAWAY (see connection.py) and its open streams
finish; after `grace` seconds what is left is cancelled (RST_STREAM CANCEL) and closed, as grpcio's
`server.stop(grace)` does."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from epp.extproc.h2.connection import DEFAULT_CONFIG, H2Config, H2Connection, Session
from epp.extproc.tls import cert_files, self_signed

log = logging.getLogger("epp.extproc.h2")


def server_ssl_context(cert_path: str | None) -> ssl.SSLContext:
    """TLS for the ext_proc port, with the same certificates as the grpcio transport: tls.crt and tls.key
    from `cert_path`, or a self-signed one made now. ALPN offers h2 only; a client that offers no ALPN
    (Envoy's UpstreamTlsContext without alpn_protocols) is served HTTP/2 with prior knowledge."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    ctx.options |= ssl.OP_NO_COMPRESSION
    if cert_path:
        crt, key = cert_files(cert_path)
        ctx.load_cert_chain(crt, key)
        return ctx
    key_pem, cert_pem = self_signed(os.environ.get("POD_NAME", "epp"))
    with tempfile.TemporaryDirectory(prefix="epp-tls-") as tmp:  # load_cert_chain reads files only
        crt, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        crt.write_bytes(cert_pem)
        ctx.load_cert_chain(crt, key)
    return ctx


class H2Server:
    """Serves the ext_proc stream: `new_session()` makes one session per stream."""

    def __init__(self, new_session: Callable[[], Session], config: H2Config = DEFAULT_CONFIG,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        hpack_log = logging.getLogger("hpack")
        if hpack_log.level == logging.NOTSET:  # hpack logs every decoded header at debug: drowns --log-level debug
            hpack_log.setLevel(logging.INFO)
        self._new_session = new_session
        self._config = config
        self._ssl = ssl_context
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[H2Connection] = set()
        self._idle: asyncio.Event | None = None

    def _protocol(self) -> H2Connection:
        return H2Connection(self._new_session, self._config, on_made=self.connections.add, on_lost=self._lost)

    def _lost(self, conn: H2Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._idle is not None:
            self._idle.set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, ssl=self._ssl, reuse_address=True,
                                                backlog=1024)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        self._idle = asyncio.Event()
        if self.connections:
            for conn in list(self.connections):
                conn.shutdown()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.info("ext_proc: %d connection(s) still busy after %.1fs; cancelling their streams",
                         len(self.connections), grace)
        for conn in list(self.connections):
            conn.abort()
        try:
            await asyncio.wait_for(server.wait_closed(), 1.0)
        except TimeoutError:
            pass
