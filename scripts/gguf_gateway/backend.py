"""Connections to llama-server on loopback.

A small pool keeps keep-alive connections warm: a new TCP connection plus llama-server's
accept path costs more than the whole gateway hop for a small request. Idle connections
are dropped before llama-server's own keep-alive timeout (cpp-httplib: 5 s) so a request
is rarely written into a socket the server is closing; when that race is lost anyway and
no byte of the response came back, the request is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import time

from .channel import Channel, channel_type
from .http11 import ChunkedDecoder, HttpError, Limits, ResponseHead, parse_response_head

POOL_IDLE_SECONDS = 4.0
POOL_MAX_IDLE = 64
# What a backend channel buffers before it pauses reading: llama-server's whole
# answers (a batch of embeddings) are read into memory anyway.
BACKEND_BUFFER = 1 << 20
# llama-server is trusted: its responses are framed strictly but not size-capped.
BACKEND_LIMITS = Limits(max_body=1 << 40)
# A whole response read into memory (embeddings, rerank, the non-streaming Responses and
# Messages answers) stops here: a key can ask for a batch whose answer is thousands of
# times its body. OpenAI's largest embedding batch (2,048 inputs of 4,096 floats as
# JSON, about 170 MB) fits.
MAX_BUFFERED_BODY = 256 * 1024 * 1024


class BackendUnavailable(Exception):
    """llama-server refused or dropped the connection before a response head."""


class BackendConnection:
    __slots__ = ("channel", "buf", "reused", "idle_since")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.buf = channel.buf  # the channel appends in place: one buffer, two names
        self.reused = False
        self.idle_since = 0.0

    def close(self) -> None:
        # abort, not close: llama-server must see the connection drop at once to free
        # the slot, without waiting for buffered bytes to flush.
        self.channel.abort()

    def take_buffered(self) -> bytes:
        """Every byte read from llama-server and not consumed yet, before a hand-over."""
        return self.channel.take(len(self.buf))

    async def _more(self, what: str) -> None:
        if not await self.channel.more():
            raise BackendUnavailable(f"llama-server closed the connection{what}")

    async def read_head(self) -> ResponseHead:
        while True:
            head = parse_response_head(self.buf, BACKEND_LIMITS)
            if head is not None:
                return head
            await self._more("")

    def buffered_body(self, head: ResponseHead) -> bytes | None:
        """The body, if all of it (Content-Length framed) has already been read."""
        length = head.content_length
        if head.chunked or length is None or len(self.buf) < length:
            return None
        return self.channel.take(length)

    async def read_body(self, head: ResponseHead) -> bytes:
        """The whole body of a non-streamed response, up to MAX_BUFFERED_BODY."""
        too_large = HttpError(
            502,
            f"llama-server's response is larger than the {MAX_BUFFERED_BODY} bytes "
            "the gateway buffers",
        )
        if head.chunked:
            decoder = ChunkedDecoder(BACKEND_LIMITS, MAX_BUFFERED_BODY)
            try:
                parts = [decoder.feed(self.buf)]
                while not decoder.done:
                    await self._more(" mid-body")
                    parts.append(decoder.feed(self.buf))
            except HttpError as exc:
                raise too_large if exc.status == 413 else exc from None
            return b"".join(parts)
        if head.content_length is None:
            # Close-delimited: read to EOF; the connection cannot be reused.
            head.keep_alive = False
            self.channel.limit = 1 << 62
            while await self.channel.more():
                if len(self.buf) > MAX_BUFFERED_BODY:
                    raise too_large
            return self.take_buffered()
        if head.content_length > MAX_BUFFERED_BODY:
            raise too_large
        while len(self.buf) < head.content_length:
            await self._more(" mid-body")
        return self.channel.take(head.content_length)


class BackendPool:
    def __init__(self, host: str, port: int, connect_timeout: float) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self._idle: list[BackendConnection] = []

    async def connect(self) -> BackendConnection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                kind = channel_type()
                # Both loops set TCP_NODELAY on TCP transports themselves.
                _, channel = await asyncio.get_running_loop().create_connection(
                    lambda: kind(BACKEND_BUFFER), self.host, self.port
                )
        except TimeoutError:
            # Not the client's timeout: a backend that does not accept is unreachable.
            raise BackendUnavailable(
                f"llama-server did not accept a connection within {self.connect_timeout}s"
            ) from None
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot connect to llama-server: {exc.strerror or exc}"
            ) from None
        return BackendConnection(channel)

    def idle(self) -> BackendConnection | None:
        """A warm connection from the pool, if one is still fresh."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < POOL_IDLE_SECONDS and not conn.channel.eof:
                conn.reused = True
                return conn
            conn.close()
        return None

    def release(self, conn: BackendConnection, reusable: bool) -> None:
        if reusable and not conn.buf and len(self._idle) < POOL_MAX_IDLE:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def close_all(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def exchange(
        self, request: bytes, first_byte: float | None = None
    ) -> tuple[BackendConnection, ResponseHead]:
        """Send a complete request and read the response head, retrying a stale socket once.

        ``first_byte``: seconds the head may take once the request is written (TimeoutError).
        """
        conn = self.idle() or await self.connect()
        deadline = None if first_byte is None else conn.channel.time() + first_byte
        try:
            return conn, await self._send(conn, request, deadline)
        except BackendUnavailable:
            if not conn.reused:
                raise
        conn = await self.connect()
        return conn, await self._send(conn, request, deadline)

    @staticmethod
    async def _send(
        conn: BackendConnection, request: bytes, deadline: float | None
    ) -> ResponseHead:
        """Write the request and read the head; the connection is closed on any failure."""
        try:
            conn.channel.write(request)
            conn.channel.expire_at(deadline)
            try:
                return await conn.read_head()
            finally:
                conn.channel.expire_at(None)
        except ConnectionError as exc:
            conn.close()
            raise BackendUnavailable(f"llama-server dropped the connection: {exc}") from None
        except BaseException:
            conn.close()
            raise


async def simple_get(
    host: str, port: int, path: str, api_key: str, timeout: float
) -> tuple[int, bytes]:
    """One GET on a fresh connection, for the readiness monitor."""
    return await simple_request(host, port, "GET", path, api_key, timeout)


async def simple_request(
    host: str, port: int, method: str, path: str, api_key: str, timeout: float, body: bytes = b""
) -> tuple[int, bytes]:
    """One request on a fresh connection, for the gateway's own questions to llama-server."""
    headers = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
    if api_key:
        headers += f"Authorization: Bearer {api_key}\r\n"
    if body:
        headers += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    request = (headers + "\r\n").encode("latin-1") + body
    return await simple_exchange(host, port, request, timeout)


async def simple_exchange(
    host: str, port: int, request: bytes, timeout: float
) -> tuple[int, bytes]:
    """A request, already framed, on a fresh connection; its status and whole body."""
    pool = BackendPool(host, port, timeout)
    async with asyncio.timeout(timeout):
        conn = await pool.connect()
        try:
            conn.channel.write(request)
            head = await conn.read_head()
            answer = await conn.read_body(head)
        except (HttpError, ConnectionError) as exc:
            raise BackendUnavailable(str(exc)) from None
        finally:
            conn.close()
    return head.status, answer
