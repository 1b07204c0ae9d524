"""The client side of a connection: the mirror of backend.BackendConnection.

Channel, buffer and head parser travel together; ``read_head`` and ``read_body`` are the
only places client bytes are read for a request. Deadlines cover a whole head
(CLIENT_HEADER_TIMEOUT) and a whole body (CLIENT_BODY_TIMEOUT), not single reads, so a
client trickling a byte at a time cannot hold a connection. While a request is with the
backend, :class:`ClientWatch` listens for the channel's end of input instead: the client
left, and the request's task is cancelled, which closes the backend connection.
"""

from __future__ import annotations

import asyncio
import contextlib

from .channel import READ_SIZE, Channel
from .http11 import ChunkedDecoder, Limits, RequestHead, RequestHeadParser

# Pipelined bytes a client may send while its previous request is in flight.
MAX_PIPELINED = 65536
# What a refused client may still be sending is read and dropped, within these bounds,
# before the close: closing with unread bytes makes the kernel send a reset, and the
# client would see a connection error instead of our status.
LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 2.0


class ClientGone(Exception):
    """The client closed its connection before its response was complete."""


class ClientConnection:
    __slots__ = ("channel", "buf", "parser", "limits", "requests", "busy", "task")

    def __init__(self, channel: Channel, limits: Limits) -> None:
        self.channel = channel
        self.buf = channel.buf  # the channel appends in place: one buffer, two names
        self.limits = limits
        self.parser = RequestHeadParser(limits)
        self.requests = 0
        self.busy = False
        self.task: asyncio.Task[None] | None = None

    async def read_head(self, first_wait: float, head_timeout: float) -> RequestHead | None:
        """The next request head; None when the client closed between requests.

        ``first_wait`` bounds the wait for a first byte (longer between keep-alive
        requests); from the first byte on, the whole head must arrive in ``head_timeout``.
        Raises HttpError for a head that cannot be parsed, TimeoutError when late.
        """
        buf = self.buf
        parse = self.parser.parse
        channel = self.channel
        try:
            if not buf:
                channel.expire_at(channel.time() + first_wait)
                if not await channel.more():
                    return None
            head = parse(buf)
            if head is not None:
                return head  # the usual case: the whole head in one read
            channel.expire_at(channel.time() + head_timeout)
            while True:
                if not await channel.more():
                    return None
                head = parse(buf)
                if head is not None:
                    return head
        finally:
            channel.expire_at(None)

    async def read_body(self, head: RequestHead, timeout: float, max_body: int) -> bytes:
        """The whole body (Content-Length or chunked), which must arrive within ``timeout``.

        A chunked body is bounded by ``max_body`` as it arrives (413); the caller checks a
        Content-Length against it before reading.
        """
        if not head.has_body:
            return b""
        length = head.content_length or 0
        if not head.chunked and len(self.buf) >= length:
            return self.channel.take(length)  # the usual case: it came with the head
        if head.expect_continue and not self.buf:
            self.channel.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # A body may be larger than what the channel buffers between requests.
        self.channel.limit = max(READ_SIZE, length)
        try:
            async with asyncio.timeout(timeout):
                if head.chunked:
                    return await self._read_chunked(max_body)
                return await self._read_length(length)
        finally:
            self.channel.limit = MAX_PIPELINED

    async def _more(self) -> None:
        if not await self.channel.more():
            raise ClientGone()

    async def _read_chunked(self, max_body: int) -> bytes:
        decoder = ChunkedDecoder(self.limits, max_body)
        parts = [decoder.feed(self.buf)]
        while not decoder.done:
            await self._more()
            parts.append(decoder.feed(self.buf))
        return b"".join(parts)

    async def _read_length(self, length: int) -> bytes:
        while len(self.buf) < length:
            await self._more()
        return self.channel.take(length)

    async def caught_up(self, timeout: float) -> bool:
        """Whether the client took what it was sent down to the low-water mark in time.

        A client that does not is aborted: its unread response is dropped with it.
        """
        channel = self.channel
        if not channel.write_paused:
            return True
        try:
            async with asyncio.timeout(timeout):
                await channel.drain()
            return True
        except TimeoutError:
            channel.abort()
            return False

    def flush_within(self, timeout: float) -> None:
        """After close: abort if what is still buffered is not taken within ``timeout``.

        A transport being closed keeps its connection until its buffer is written, which
        a client that stopped reading would hold forever.
        """
        transport = self.channel.transport
        if transport is not None and not self.channel.lost and transport.get_write_buffer_size():
            # The transport's own abort: the channel's skips a transport already closing.
            self.channel.current_loop().call_later(timeout, transport.abort)

    def watch(self) -> ClientWatch:
        return ClientWatch(self.channel)

    async def close(self, linger: bool) -> None:
        """Close; after a refusal, first read and drop what the client is still sending."""
        channel = self.channel
        if channel.closing:
            channel.abort()
            return
        if linger:
            with contextlib.suppress(OSError, RuntimeError):
                # Our response is out; say so, then read until the client is done.
                await channel.drain()
                channel.write_eof()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(LINGER_SECONDS):
                    dropped = 0
                    while dropped < LINGER_BYTES:
                        dropped += len(self.buf)
                        self.buf.clear()
                        if not await channel.more():
                            break
        channel.close()


class ClientWatch:
    """Listens for the client leaving while its request is with the backend.

    End of input or a lost connection cancels the request's task. Bytes that arrive (a
    pipelined request) stay in the connection buffer for the parser; reading pauses
    beyond MAX_PIPELINED of them.
    """

    __slots__ = ("_task", "_channel", "gone")

    def __init__(self, channel: Channel) -> None:
        self._task = channel.current_task()
        self._channel = channel
        self.gone = False
        if channel.eof:
            self._left()
        else:
            channel.on_eof = self._left

    def _left(self) -> None:
        self._channel.on_eof = None
        self.gone = True
        self._task.cancel()

    def stop(self) -> None:
        self._channel.on_eof = None
