"""The floor of the overhead benchmark: an ext_proc server that does the least an endpoint picker must, on
epp's own transport (`--transport fast`, epp/extproc/h2), with no director, plugins, metrics or scraping.

    python -m bench.null_extproc --port 9002 --endpoints 127.0.0.2:8000,127.0.0.3:8000 [--host 127.0.0.1]

Per stream, as epp in FULL_DUPLEX_STREAMED mode: the request headers' answer waits for the body; at the
body's end it answers with the destination (the next endpoint of the list, round-robin, as the
`x-gateway-destination-endpoint` header and `envoy.lb` metadata, from the same pre-serialized replies epp
uses) and echoes the body; the response headers are continued unchanged. Anything else is continued or
ignored. `bench.overhead --floor` runs it beside each epp: the latency Envoy's ext_proc round trips and the
transport add with nothing else, measured under the same conditions, so that the cost of routing itself is
the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

from epp.extproc import protocol as p
from epp.extproc.h2.server import H2Server


class NullSession:
    """One ext_proc stream: route to the next endpoint, echo the body, continue the response."""

    __slots__ = ("destinations", "replies", "body")

    def __init__(self, destinations: itertools.cycle, replies: p.ReplyCache) -> None:
        self.destinations = destinations
        self.replies = replies
        self.body = bytearray()

    def handle(self, msg: p.ProcessingRequest) -> list[p.Reply]:
        kind = msg.WhichOneof("request")
        if kind == "request_body":
            body = msg.request_body
            if not body.end_of_stream:
                self.body += body.body
                return []
            self.body += body.body
            whole = bytes(self.body)
            self.body = bytearray()
            return [self.replies.request_headers_routed(next(self.destinations)),
                    *p.streamed_chunks(whole, True, response=False)]
        if kind == "response_headers":
            return [p.response_headers_reply({})]
        if kind == "request_trailers":
            return [p.request_trailers()]
        if kind == "response_trailers":
            return [p.response_trailers()]
        return []  # request headers: answered with the body

    def close(self) -> None:
        pass


async def serve(host: str, port: int, endpoints: list[str]) -> None:
    destinations = itertools.cycle(endpoints)
    replies = p.ReplyCache()
    server = H2Server(lambda: NullSession(destinations, replies))
    await server.start(host, port)
    print(f"null ext_proc server on {host}:{port}, {len(endpoints)} endpoints", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--endpoints", required=True, help="host:port pairs separated by commas")
    args = ap.parse_args()
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if not endpoints:
        raise SystemExit("--endpoints: give at least one host:port")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, endpoints))
    else:
        uvloop.run(serve(args.host, args.port, endpoints))


if __name__ == "__main__":
    main()
