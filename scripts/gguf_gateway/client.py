"""The client side of a connection: the mirror of backend.BackendConnection.

Reader, writer, buffer and head parser travel together; ``read_head`` and ``read_body``
are the only places client bytes are read for a request. Deadlines cover a whole head
(CLIENT_HEADER_TIMEOUT) and a whole body (CLIENT_BODY_TIMEOUT), not single reads, so a
client trickling a byte at a time cannot hold a connection. While a request is with the
backend, :class:`ClientWatch` reads the socket instead: end of file means the client
left, and the request's task is cancelled, which closes the backend connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from .backend import READ_SIZE
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
    __slots__ = ("reader", "writer", "buf", "parser", "limits", "requests", "busy")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.limits = limits
        self.parser = RequestHeadParser(limits)
        self.requests = 0
        self.busy = False

    async def read_head(self, first_wait: float, head_timeout: float) -> RequestHead | None:
        """The next request head; None when the client closed between requests.

        ``first_wait`` bounds the wait for a first byte (longer between keep-alive
        requests); from the first byte on, the whole head must arrive in ``head_timeout``.
        Raises HttpError for a head that cannot be parsed, TimeoutError when late.
        """
        buf = self.buf
        head = self.parser.parse(buf) if buf else None
        if head is not None:
            return head
        if not buf:
            async with asyncio.timeout(first_wait):
                data = await self.reader.read(READ_SIZE)
            if not data:
                return None
            buf += data
            head = self.parser.parse(buf)
            if head is not None:
                return head  # the usual case: the whole head in one read
        async with asyncio.timeout(head_timeout):
            while True:
                head = self.parser.parse(buf)
                if head is not None:
                    return head
                data = await self.reader.read(READ_SIZE)
                if not data:
                    return None
                buf += data

    async def read_body(self, head: RequestHead, timeout: float) -> bytes:
        """The whole body (Content-Length or chunked), which must arrive within ``timeout``."""
        if not head.has_body:
            return b""
        length = head.content_length or 0
        if not head.chunked and len(self.buf) >= length:
            return self._take(length)  # the usual case: it came with the head, no timer
        if head.expect_continue and not self.buf:
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        async with asyncio.timeout(timeout):
            if head.chunked:
                return await self._read_chunked()
            return await self._read_length(length)

    async def _more(self, size: int = READ_SIZE) -> None:
        data = await self.reader.read(size)
        if not data:
            raise ClientGone()
        self.buf += data

    async def _read_chunked(self) -> bytes:
        decoder = ChunkedDecoder(self.limits, self.limits.max_body)
        parts = [decoder.feed(self.buf)]
        while not decoder.done:
            await self._more()
            parts.append(decoder.feed(self.buf))
        return b"".join(parts)

    async def _read_length(self, length: int) -> bytes:
        while len(self.buf) < length:
            await self._more(max(READ_SIZE, length - len(self.buf)))
        return self._take(length)

    def _take(self, length: int) -> bytes:
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return body

    def watch(self) -> ClientWatch:
        return ClientWatch(self.reader, self.buf)

    async def close(self, linger: bool) -> None:
        """Close; after a refusal, first read and drop what the client is still sending."""
        transport = self.writer.transport
        if transport.is_closing():
            transport.abort()
            return
        if linger:
            with contextlib.suppress(OSError, RuntimeError):
                sock = self.writer.get_extra_info("socket")
                if sock is not None:
                    # Our response is out; say so, then read until the client is done.
                    await self.writer.drain()
                    sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                async with asyncio.timeout(LINGER_SECONDS):
                    dropped = 0
                    while dropped < LINGER_BYTES:
                        data = await self.reader.read(READ_SIZE)
                        if not data:
                            break
                        dropped += len(data)
        self.writer.close()


class ClientWatch:
    """Reads the client socket while its request is with the backend.

    EOF or a reset cancels the request's task. Bytes that arrive (a pipelined request)
    are kept in the connection buffer for the parser.
    """

    __slots__ = ("_task", "gone")

    def __init__(self, reader: asyncio.StreamReader, buf: bytearray) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.gone = False
        self._task = asyncio.ensure_future(self._watch(reader, buf, task))

    async def _watch(
        self, reader: asyncio.StreamReader, buf: bytearray, task: asyncio.Task[object]
    ) -> None:
        try:
            while len(buf) < MAX_PIPELINED:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                buf += data
            else:
                return
        except ConnectionError:
            pass
        self.gone = True
        task.cancel()

    async def stop(self) -> None:
        # A stream reader allows one waiting reader at a time: the watcher must have
        # left read() before the connection reads its next request.
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait((self._task,))
