"""The benchmarks' lean HTTP/1.1 client (bench/httpclient.py): it must frame every kind of answer a server
or Envoy may send, reuse connections only when allowed, and count what failed instead of timing it."""

from __future__ import annotations

import asyncio

import pytest

from bench.httpclient import Client


class Server:
    """A loopback server that answers each request with the next scripted reply, `split` bytes at a time."""

    def __init__(self, replies: list[bytes], split: int = 0, close_after: bool = False) -> None:
        self.replies = list(replies)
        self.split = split
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/chat/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies.pop(0)
                step = self.split or len(reply)
                for i in range(0, len(reply), step):
                    writer.write(reply[i : i + step])
                    await writer.drain()
                    await asyncio.sleep(0)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
CHUNKED_TRAILERS = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nx-t: 1\r\n\r\n"


@pytest.mark.parametrize("reply", [OK, CHUNKED, CHUNKED_TRAILERS], ids=["content-length", "chunked", "trailers"])
@pytest.mark.parametrize("split", [0, 1], ids=["whole", "byte-by-byte"])
async def test_each_framing_completes_and_the_connection_is_reused(reply: bytes, split: int) -> None:
    async with Server([reply, reply], split=split) as server:
        client = Client(server.url)
        await client.one(b'{"a": 1}')
        await client.one(b'{"b": 22}')
        await client.close()
    assert client.errors == 0
    assert len(client.latencies) == 2
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Content-Length: 8\r\n" in first and first.endswith(b'\r\n\r\n{"a": 1}')
    assert server.requests[1].endswith(b'{"b": 22}')


async def test_an_answer_read_until_close_counts_and_the_next_request_opens_a_new_connection() -> None:
    reply = b"HTTP/1.1 200 OK\r\n\r\nbody until the end"
    async with Server([reply], close_after=True) as server:
        client = Client(server.url)
        await client.one(b"x")
        assert (client.errors, len(client.latencies)) == (0, 1)
        server.replies.append(OK)
        await client.one(b"y")
        await client.close()
    assert (client.errors, len(client.latencies)) == (0, 2)
    assert server.connections == 2


async def test_connection_close_is_honoured() -> None:
    reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with Server([reply, OK], close_after=True) as server:
        client = Client(server.url)
        await client.one(b"x")
        await client.one(b"y")
        await client.close()
    assert (client.errors, len(client.latencies), server.connections) == (0, 2, 2)


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # the server closes inside the body
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\ntoo long",
], ids=["status-503", "truncated", "not-http", "extra-bytes"])
async def test_failures_are_counted_not_timed(reply: bytes) -> None:
    async with Server([reply], close_after=True) as server:
        client = Client(server.url)
        await client.one(b"x")
        await client.close()
    assert client.errors == 1
    assert client.latencies == []


async def test_a_refused_connection_is_an_error() -> None:
    async with Server([]) as server:
        url = server.url
    client = Client(url)
    await client.one(b"x")
    assert (client.errors, client.latencies) == (1, [])


def test_only_plain_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="plain http://"):
        Client("https://127.0.0.1:1/x")
