"""The streaming hot path: llama-server's chunked SSE bytes straight to the client.

While a stream is relayed, the backend connection's transport is handed this protocol
instead of its channel. Each read from llama-server is then framing-checked and
written to the client inside the protocol's read callback (``data_received``; on
asyncio's loop through ``buffer_updated``, as channel.py explains): no task wake-up, no
reader buffer, no timer and no clock read per event (the idle watchdog looks at the read
count). Only the few reads that end a task (where llama-server puts ``usage``) are
parsed, to settle the request's tokens. The coroutine that owns the request only wakes when the stream ends,
fails, or the client's socket is full (backpressure: the client's transport paused its
channel, so reading from llama-server pauses until the client has drained).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from enum import Enum
from typing import cast

from .backend import BACKEND_LIMITS
from .cache_counters import CACHE_MARK
from .channel import RECEIVE_BUFFER, Channel, buffered_loop
from .http11 import LAST_CHUNK, ChunkedDecoder, ChunkedScanner, HttpError, chunk
from .sse import UsageTally


class PipeEvent(Enum):
    DONE = "done"  # the last chunk went past
    PAUSED = "paused"  # the client is behind; drain it, then resume()


class BackendClosed(Exception):
    """llama-server closed or reset the connection before the stream's end."""


class StreamPipe(asyncio.Protocol):
    """Relays one stream; reads that carry usage are held to a chunk boundary and tallied.

    ``tally``: where the usage of each finished task is summed (None: not read).
    ``strip_usage``: drop the usage-only chunks the client did not ask for.
    ``conceal``: reads with prompt-cache counters are held too, and their events
    rewritten to read "nothing cached" (cache_counters.py); one more substring search
    per read.
    """

    def __init__(
        self,
        client: Channel,
        *,
        decode: bool,
        tally: UsageTally | None,
        strip_usage: bool,
        conceal: bool = False,
    ) -> None:
        self.client = client
        assert client.transport is not None
        self._write = client.transport.write
        self.reads = 0  # what the idle watchdog follows
        self.scanner = ChunkedScanner()
        # HTTP/1.0 clients cannot take chunked framing: their bytes are decoded.
        self.decoder = ChunkedDecoder(BACKEND_LIMITS) if decode else None
        self._decode_buf = bytearray()
        self.tally = tally
        # What marks a read that carries usage, in this stream's format.
        self._mark = tally.mark if tally is not None else b""
        self.strip_usage = strip_usage
        # Shown each read until it returns True (a completion id to remember); None
        # for almost every stream.
        self.watch: Callable[[bytes], bool] | None = None
        self.conceal = conceal and tally is not None
        # Bytes of a read with usage in it, kept until the chunk it is in is complete.
        self._held = bytearray()
        self.sent = 0
        self.finished = False
        # Reading is paused for the client (backpressure): not the backend's silence.
        self.paused = False
        # llama-server closed its end (it does after every stream), possibly right after
        # the last chunk: the connection must not go back to the pool.
        self.backend_closed = False
        self.backend: asyncio.Transport | None = None
        self._loop = client.current_loop()
        self._waiter: asyncio.Future[PipeEvent] = self._loop.create_future()

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
        self.reads += 1
        if self.watch is not None and self.watch(data):
            self.watch = None
        # Usage is read from whole chunks only: a read that starts inside a chunk goes
        # through untallied (and the request keeps its reservation: never under-counted).
        # Concealing, a read that ends inside a chunk is held too, so that every read
        # starts on a boundary and no cache counter can pass in the second half of one.
        boundary = self.scanner.at_boundary
        try:
            done = self.scanner.feed(data)
            hold = self._held or (
                boundary
                and self.tally is not None
                and (
                    self._mark in data
                    or (
                        self.conceal
                        and (CACHE_MARK in data or not (done or self.scanner.at_boundary))
                    )
                )
            )
            if hold:
                # The rare read that ends a task: parse it (once whole), pass the rest.
                self._held += data
                if not (done or self.scanner.at_boundary):
                    return
                self._write_settled(done)
            elif self.decoder is None:
                self._write(data)
                self.sent += len(data)
            else:
                self._write_decoded(data)
        except HttpError as exc:
            self._wake(exc)
            return
        if done:
            self.finished = True
            self._wake(PipeEvent.DONE)
        elif self.client.write_paused and self.backend is not None:
            # The client is RESPONSE_BUFFER_SIZE behind (its transport's high-water mark).
            self.backend.pause_reading()
            self.paused = True
            self._wake(PipeEvent.PAUSED)

    def _write_decoded(self, data: bytes) -> None:
        assert self.decoder is not None
        self._decode_buf += data
        payload = self.decoder.feed(self._decode_buf)
        self._write(payload)
        self.sent += len(payload)

    def _write_settled(self, last: bool) -> None:
        """Tally the held whole chunks' usage and write them, re-framed if events were cut."""
        assert self.tally is not None
        held = bytes(self._held)
        self._held.clear()
        decoder = ChunkedDecoder(BACKEND_LIMITS)
        payload = decoder.feed(bytearray(held))
        kept = self.tally.add_events(payload, self.strip_usage, self.conceal)
        if self.decoder is not None:
            out = kept  # HTTP/1.0: the client gets the events without framing
        elif kept == payload:
            out = held  # nothing dropped or rewritten: the backend's bytes as they came
        else:
            out = (chunk(kept) if kept else b"") + (LAST_CHUNK if last else b"")
        self._write(out)
        self.sent += len(out)

    def eof_received(self) -> bool:
        self.backend_closed = True
        self._wake(BackendClosed("llama-server closed the stream early"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend_closed = True
        self._wake(BackendClosed(f"llama-server connection lost: {exc or 'closed'}"))

    async def next_event(self) -> PipeEvent:
        """Wait for the stream's end (DONE) or for the client to fall behind (PAUSED)."""
        outcome = await self._waiter
        if outcome is PipeEvent.PAUSED:
            self._waiter = self._loop.create_future()
        return outcome

    def resume(self) -> None:
        self.paused = False
        if self.backend is not None and not self.backend.is_closing():
            self.backend.resume_reading()


class BufferedStreamPipe(StreamPipe, asyncio.BufferedProtocol):
    """A pipe that receives into the shared buffer: for asyncio's selector loop."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return RECEIVE_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(RECEIVE_BUFFER[:nbytes].tobytes())


def stream_pipe_type(client: Channel) -> type[StreamPipe]:
    """The pipe class for the client's loop (channel.py says why they differ)."""
    return BufferedStreamPipe if buffered_loop(client.current_loop()) else StreamPipe
