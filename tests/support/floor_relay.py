"""The floor under the bench's CPU figures: a relay with no logic at all.

Built as the gateway is (an asyncio protocol per connection feeding one coroutine per
client connection, pooled keep-alive connections to llama-server, a stream's reads
written to the client from the backend's read callback) but doing nothing between the
sockets: no validation, no key, no limit, no body check, no framing check, no
accounting. What it costs per request or per relayed event is what any Python relay on
that event loop pays before it does any of the gateway's work; the bench reports it
beside the gateway and nginx.

    python tests/support/floor_relay.py PORT BACKEND_PORT BACKEND_KEY asyncio|uvloop

It understands exactly the bench's traffic (Content-Length requests; Content-Length or
chunked responses, a chunked one ending with the read that ends in its last chunk);
anything else is out of scope.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Callable, cast

END = b"\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class Side(asyncio.Protocol):
    """Bytes in, one waiter woken; or, while ``sink`` is set, bytes straight out to it."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.sink: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.buf += data
            self._wake()
            return
        sink.write(data)
        if data.endswith(LAST_CHUNK):
            self.sink = None
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def more(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.closed:
            raise ConnectionError("closed")
        self.waiter = loop.create_future()
        await self.waiter

    async def head(self, loop: asyncio.AbstractEventLoop) -> bytes:
        """One head, without its blank line, taken from the buffer."""
        while (end := self.buf.find(END)) < 0:
            await self.more(loop)
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        return head

    async def body(self, loop: asyncio.AbstractEventLoop, length: int) -> bytes:
        while len(self.buf) < length:
            await self.more(loop)
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return body

    async def relay_chunked(self, loop: asyncio.AbstractEventLoop, out: asyncio.Transport) -> None:
        """Pass a chunked body to ``out`` from the read callback until its last chunk."""
        early = bytes(self.buf)
        self.buf.clear()
        if early:
            out.write(early)
            if early.endswith(LAST_CHUNK):
                return
        self.sink = out
        while self.sink is not None:
            await self.more(loop)


class ClientSide(Side):
    """A client connection: its coroutine starts once the transport is there."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        # Held here: the loop keeps only weak references to tasks.
        self.task = loop.create_task(self.relay.serve(self, loop))


def content_length(head: bytes) -> int:
    start = head.lower().find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    end = head.find(b"\r\n", start + 2)
    return int(head[start + 17 : end if end >= 0 else len(head)])


class Relay:
    def __init__(self, backend_port: int, backend_key: str) -> None:
        self.backend_port = backend_port
        self.auth = f"Authorization: Bearer {backend_key}\r\n".encode()
        self.idle: list[Side] = []

    async def connect(self, loop: asyncio.AbstractEventLoop) -> Side:
        _, side = await loop.create_connection(Side, "127.0.0.1", self.backend_port)
        return side

    async def send(self, loop: asyncio.AbstractEventLoop, request: bytes) -> tuple[Side, bytes]:
        """The request to a pooled connection, or a new one when that one was closed."""
        while self.idle:
            side = self.idle.pop()
            if side.closed or side.transport is None:
                continue
            side.transport.write(request)
            try:
                return side, await side.head(loop)
            except ConnectionError:
                break  # llama-server closed it as we sent: once more, on a new one
        side = await self.connect(loop)
        assert side.transport is not None
        side.transport.write(request)
        return side, await side.head(loop)

    def client(self) -> ClientSide:
        return ClientSide(self)

    async def serve(self, client: Side, loop: asyncio.AbstractEventLoop) -> None:
        assert client.transport is not None
        out = client.transport
        try:
            while True:
                head = await client.head(loop)
                body = await client.body(loop, content_length(head))
                line = head[: head.find(b"\r\n")]
                request = b"%s\r\nHost: llama\r\n%sContent-Type: application/json\r\n" % (
                    line,
                    self.auth,
                )
                request += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                backend, response_head = await self.send(loop, request)
                assert backend.transport is not None
                out.write(response_head + END)
                lower = response_head.lower()
                if b"transfer-encoding: chunked" in lower:
                    await backend.relay_chunked(loop, out)
                else:
                    out.write(await backend.body(loop, content_length(response_head)))
                if b"connection: close" in lower:
                    backend.transport.close()
                else:
                    self.idle.append(backend)
        except ConnectionError:
            pass
        finally:
            out.close()


async def main(port: int, backend_port: int, backend_key: str) -> None:
    relay = Relay(backend_port, backend_key)
    server = await asyncio.get_running_loop().create_server(relay.client, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port_arg, backend_arg, key_arg, loop_arg = sys.argv[1:5]
    factory: Callable[[], asyncio.AbstractEventLoop]
    if loop_arg == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(int(port_arg), int(backend_arg), key_arg))
