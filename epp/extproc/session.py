"""One ext_proc stream (= one HTTP request) as a state machine: `handle(message) -> [responses]`.

No I/O here, so any transport can drive it and tests can feed it message sequences directly.

Request path, FULL_DUPLEX_STREAMED (the recommended mode): the request-headers answer is deferred until the
body is complete; then the headers answer (destination header, `envoy.lb` metadata) is sent, followed by
the body echoed in chunks of at most 62,000 bytes. BUFFERED: headers are answered at once, and the
destination goes out with the body answer. A request whose headers end the stream (GET) goes to a random
eligible endpoint at once.

Response path: status and headers are recorded, body chunks are echoed (full duplex) or acknowledged
(buffered) and fed to the parser for `usage`; the request's state is released at the response's end,
or by `close()` when the stream ends early (client or Envoy gone).
"""

from __future__ import annotations

import logging
from time import monotonic, perf_counter

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

from epp.director import Director, Routed
from epp.errors import RequestError, error_body
from epp.extproc import protocol as p
from epp.request import request_id_of

log = logging.getLogger("epp.extproc")

_Mode = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = _Mode.FULL_DUPLEX_STREAMED
BUFFERED_MODES = (_Mode.BUFFERED, _Mode.BUFFERED_PARTIAL)

_REWRITE_PATTERNS = (b'"model":"%s"', b'"model": "%s"')


class ExtProcSession:
    __slots__ = ("director", "max_body_bytes", "replies", "headers", "body", "routed", "request_id", "start",
                 "subset", "request_mode", "response_mode", "finished_request", "closed", "_model_swap")

    def __init__(self, director: Director, max_body_bytes: int, replies: p.ReplyCache | None = None) -> None:
        self.director = director
        self.max_body_bytes = max_body_bytes
        self.replies = replies if replies is not None else p.ReplyCache()
        self.headers: dict[str, str] | None = None
        self.body = bytearray()
        self.routed: Routed | None = None
        self.request_id = ""
        self.start = 0.0
        self.subset: list[str] | None = None
        self.request_mode = FULL_DUPLEX
        self.response_mode = FULL_DUPLEX
        self.finished_request = False  # the routing answer (or an immediate response) has been sent
        self.closed = False  # an immediate response ended the exchange
        self._model_swap: list[tuple[bytes, bytes]] | None = None

    # ------------------------------------------------------------------ entry point

    def handle(self, msg: p.ProcessingRequest) -> list[p.Reply]:
        """The answers to one message from Envoy, in order (messages, or already serialized bytes)."""
        if self.closed:
            return []
        kind = msg.WhichOneof("request")
        try:
            if kind == "request_headers":
                return self._request_headers(msg)
            if kind == "request_body":
                return self._request_body(msg)
            if kind == "request_trailers":
                return self._request_trailers(msg)
            if kind == "response_headers":
                return self._response_headers(msg)
            if kind == "response_body":
                return self._response_body(msg)
            if kind == "response_trailers":
                return self._response_trailers()
        except RequestError as exc:
            return self._reject(exc.status, exc.message)
        return []  # an empty or unknown message: nothing to answer

    def close(self) -> None:
        """The stream ended. Releases the request's state if its response did not complete. When the gateway
        sends no response body (response_body_mode NONE), Envoy keeps the stream open until the response ends,
        so the end of the stream after the response headers is the response's end, not an abort."""
        routed = self.routed
        if routed is None or routed.done:
            return
        if self.response_mode == _Mode.NONE and routed.response.status:
            routed.response.end_of_stream = True
            self.director.complete(routed)
        else:
            self.director.complete(routed, aborted=True)

    # ------------------------------------------------------------------ request path

    def _request_headers(self, msg: p.ProcessingRequest) -> list[p.Reply]:
        if self.headers is not None:
            raise RequestError(400, "protocol error: request headers received twice on one ext_proc stream")
        self.start = monotonic()
        if msg.HasField("protocol_config"):
            cfg = msg.protocol_config
            self.request_mode = cfg.request_body_mode
            self.response_mode = cfg.response_body_mode
            if self.response_mode == _Mode.NONE:
                self.director.gateway_sends_no_response_body()
        self.headers = headers = p.header_map(msg.request_headers)
        self.request_id = request_id_of(headers)
        self.subset = p.subset_hint(msg)
        if msg.request_headers.end_of_stream or self.request_mode == _Mode.NONE:
            routed = self.director.route_header_only(headers, self.request_id, self.subset, self.start)
            self.routed = routed
            self.finished_request = True
            return [self.replies.request_headers_routed(routed.endpoint.hostport)]
        if self.request_mode in BUFFERED_MODES:
            return [p.continue_request_headers()]
        if self.request_mode != FULL_DUPLEX:
            raise RequestError(500, "the gateway's ext_proc filter sends request bodies in a mode the EPP cannot "
                                    "route on (STREAMED); configure request_body_mode FULL_DUPLEX_STREAMED")
        return []  # deferred until the body is complete

    def _request_body(self, msg: p.ProcessingRequest) -> list[p.Reply]:
        if self.headers is None:
            raise RequestError(400, "protocol error: request body before request headers")
        if self.finished_request:
            return []
        request_body = msg.request_body
        chunk = request_body.body
        if len(self.body) + len(chunk) > self.max_body_bytes:
            raise RequestError(400, f"request body is larger than the EPP's limit of {self.max_body_bytes} bytes "
                                    f"(flag --max-request-body-bytes)")
        if not request_body.end_of_stream:
            self.body += chunk
            return []
        if self.body:
            self.body += chunk
            return self._route(end_of_stream=True)
        return self._route(end_of_stream=True, body=chunk)  # the whole body in one message: no copy

    def _request_trailers(self, msg: p.ProcessingRequest) -> list[p.Reply]:
        if self.headers is None:
            raise RequestError(400, "protocol error: request trailers before request headers")
        out = [] if self.finished_request else self._route(end_of_stream=False)
        out.append(p.request_trailers())
        return out

    def _route(self, end_of_stream: bool, body: bytes | None = None) -> list[p.Reply]:
        """Route on `body`, or on the body buffered so far when None."""
        assert self.headers is not None
        if body is None:
            body = bytes(self.body)
            self.body = bytearray()
        t0 = perf_counter()
        routed = self.director.route(self.headers, body, self.request_id, self.subset, self.start)
        self.routed = routed
        self.finished_request = True
        if routed.model_rewritten:
            target, model = routed.request.target_model.encode(), routed.request.model.encode()
            self._model_swap = [(pat % target, pat % model) for pat in _REWRITE_PATTERNS]
        endpoints = routed.endpoints
        destination = endpoints[0].hostport if len(endpoints) == 1 else ",".join(e.hostport for e in endpoints)
        extra = routed.result.headers if routed.result is not None else {}
        remove = routed.remove_headers
        rewritten = routed.body is not body
        if self.request_mode in BUFFERED_MODES:
            out = [p.request_body_routed(destination, extra, routed.body if rewritten else None, remove)]
        else:
            if extra or rewritten or remove:
                out = [p.request_headers_routed(destination, extra, len(routed.body) if rewritten else None,
                                                remove)]
            else:
                out = [self.replies.request_headers_routed(destination)]
            out.extend(p.streamed_chunks(routed.body, end_of_stream, response=False))
        self.director.metrics.observe_request_overhead(perf_counter() - t0)
        return out

    def _reject(self, status: int, message: str) -> list[p.Reply]:
        self.closed = True
        self.finished_request = True
        if status >= 500:
            log.warning("request %s: %d %s", self.request_id or "-", status, message)
        else:
            log.debug("request %s: %d %s", self.request_id or "-", status, message)
        return [p.immediate(status, error_body(status, message), message)]

    # ------------------------------------------------------------------ response path

    def _response_headers(self, msg: p.ProcessingRequest) -> list[p.Reply]:
        routed = self.routed
        if routed is not None:
            headers = p.header_map(msg.response_headers)
            resp = routed.response
            resp.headers = headers
            status = headers.get(":status") or headers.get("status") or "0"
            resp.status = int(status) if status.isdigit() else 0
            resp.streaming = "text/event-stream" in headers.get("content-type", "")
            resp.served_endpoint = p.served_endpoint(msg)
            self.director.response_headers(routed)
            if msg.response_headers.end_of_stream:
                resp.end_of_stream = True
                self.director.complete(routed)
            return [p.response_headers_reply(resp.set_headers)]
        return [p.continue_response_headers()]

    def _response_body(self, msg: p.ProcessingRequest) -> list[p.Reply]:
        body = msg.response_body
        chunk = body.body
        routed = self.routed
        if routed is not None and not routed.done:
            routed.response.end_of_stream = body.end_of_stream
            self.director.response_chunk(routed, chunk)
            if body.end_of_stream:
                self.director.complete(routed)
        if self._model_swap is not None and chunk:
            for old, new in self._model_swap:
                chunk = chunk.replace(old, new)
            rewritten = chunk
        else:
            rewritten = None
        if self.response_mode in BUFFERED_MODES:
            return [p.buffered_body(rewritten, response=True)]
        out = chunk if rewritten is None else rewritten
        return p.streamed_chunks(out, body.end_of_stream, response=True)

    def _response_trailers(self) -> list[p.Reply]:
        routed = self.routed
        if routed is not None and not routed.done:
            routed.response.end_of_stream = True
            self.director.complete(routed)
        return [p.response_trailers()]
