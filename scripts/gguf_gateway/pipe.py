"""The streaming hot path: llama-server's chunked SSE bytes straight to the client.

While a stream is relayed, the backend connection's transport is handed this protocol
instead of its StreamReader. Each read from llama-server is then framing-checked and
written to the client inside ``data_received``: no task wake-up, no reader buffer, no
copy per event. The coroutine that owns the request only wakes when the stream ends,
fails, or the client's socket is full (backpressure: reading from llama-server pauses
until the client has drained).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from enum import Enum
from typing import cast

from .backend import BACKEND_LIMITS
from .http11 import ChunkedDecoder, ChunkedScanner, HttpError

# Mark the usage-only chunk at the end of an OpenAI-style stream (JSON escaping keeps
# them out of token text). Other stream formats (Anthropic, Responses) are not parsed.
USAGE_MARK = b'"usage":'
USAGE_ONLY = b'"choices":[]'
# Unsent bytes for the client above which reading from llama-server pauses.
HIGH_WATER = 64 * 1024


class PipeEvent(Enum):
    DONE = "done"  # the last chunk went past
    PAUSED = "paused"  # the client is behind; drain it, then resume()


class BackendClosed(Exception):
    """llama-server closed or reset the connection before the stream's end."""


class StreamPipe(asyncio.Protocol):
    def __init__(
        self,
        client: asyncio.WriteTransport,
        touch: Callable[[], None],
        *,
        decode: bool,
        watch_usage: bool,
    ) -> None:
        self.client = client
        self.touch = touch
        self.scanner = ChunkedScanner()
        # HTTP/1.0 clients cannot take chunked framing: their bytes are decoded.
        self.decoder = ChunkedDecoder(BACKEND_LIMITS) if decode else None
        self._decode_buf = bytearray()
        self.watch_usage = watch_usage
        # Once the usage-only chunk shows up, the (few) remaining bytes are kept here
        # for the owner to finish: usage read, chunk dropped if it was not asked for.
        self.tail: bytearray | None = None
        self.sent = 0
        self.finished = False
        self.backend: asyncio.Transport | None = None
        self._waiter: asyncio.Future[PipeEvent] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.backend = cast(asyncio.Transport, transport)

    def _wake(self, outcome: PipeEvent | BaseException) -> None:
        if isinstance(outcome, BaseException):
            self.finished = True
        if self._waiter.done():
            return
        if isinstance(outcome, BaseException):
            self._waiter.set_exception(outcome)
        else:
            self._waiter.set_result(outcome)

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return
        self.touch()
        try:
            if (
                self.watch_usage
                and self.tail is None
                and USAGE_ONLY in data
                and USAGE_MARK in data
                and self.scanner.at_boundary
            ):
                self.tail = bytearray()
            done = self.scanner.feed(data)
        except HttpError as exc:
            self._wake(exc)
            return
        if self.tail is not None:
            self.tail += data
        elif self.decoder is None:
            self.client.write(data)
            self.sent += len(data)
        else:
            self._decode_buf += data
            payload = self.decoder.feed(self._decode_buf)
            self.client.write(payload)
            self.sent += len(payload)
        if done:
            self.finished = True
            self._wake(PipeEvent.DONE)
        elif self.client.get_write_buffer_size() > HIGH_WATER and self.backend is not None:
            self.backend.pause_reading()
            self._wake(PipeEvent.PAUSED)

    def eof_received(self) -> bool:
        self._wake(BackendClosed("llama-server closed the stream early"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._wake(BackendClosed(f"llama-server connection lost: {exc or 'closed'}"))

    async def next_event(self) -> PipeEvent:
        """Wait for the stream's end (DONE) or for the client to fall behind (PAUSED)."""
        outcome = await self._waiter
        if outcome is PipeEvent.PAUSED:
            self._waiter = asyncio.get_running_loop().create_future()
        return outcome

    def resume(self) -> None:
        if self.backend is not None and not self.backend.is_closing():
            self.backend.resume_reading()
