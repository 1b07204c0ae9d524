"""One TCP connection's bytes, for either side of the gateway: a protocol, not streams.

Both the client side (client.py) and the backend side (backend.py) read through a
:class:`Channel`, which appends what arrives to ``buf``, where the sans-IO parsers
(http11.py) consume it in place; asyncio's streams would cost a second buffer and a task
wake-up per read. On asyncio's own (selector) loop a channel is a buffered protocol
(:class:`BufferedChannel`): a plain protocol there gets a fresh ``recv(256 KiB)`` per
read, far above malloc's mmap threshold (an mmap, mremap and munmap each time), while a
buffered one receives into one preallocated buffer. uvloop reads into a buffer of its
own and makes one call per read for a plain protocol, so there a channel is plain.

One coroutine at a time waits for more bytes with :meth:`more`. Writes go straight to
the transport; :meth:`drain` waits only while the transport has paused us. Reading
pauses while ``buf`` holds more than ``limit`` unconsumed bytes.

A wait can have a deadline (:meth:`expire_at`): ``more`` then raises TimeoutError once
it passes. Setting one is an assignment; the channel's one timer is armed when none is
and, when it fires early (the deadline moved on since), re-armed, so a keep-alive
connection serving thousands of requests creates a timer per timeout period, not per
request.
"""

from __future__ import annotations

import asyncio
from asyncio import selector_events
from collections.abc import Callable
from typing import Any, cast

# What one recv may take; also what a channel buffers before it stops reading.
READ_SIZE = 65536
# The one buffer every channel receives into: the transport copies nothing out of it
# by itself, and ``buffer_updated`` moves the bytes on before the loop reads from another
# socket (one event loop, one thread, reads one at a time).
RECEIVE_BUFFER = memoryview(bytearray(READ_SIZE))


def buffered_loop(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Whether ``loop`` (default: the running one) is asyncio's selector loop, where reads
    are buffered."""
    return isinstance(loop or asyncio.get_running_loop(), selector_events.BaseSelectorEventLoop)


def channel_type() -> type[Channel]:
    """The channel class for the running loop (see the module's docstring)."""
    return BufferedChannel if buffered_loop() else Channel


class Channel(asyncio.Protocol):
    __slots__ = (
        "transport",
        "loop",
        "buf",
        "limit",
        "eof",
        "lost",
        "on_eof",
        "_connected",
        "_waiter",
        "_deadline",
        "_timer",
        "_timer_at",
        "expired",
        "_read_paused",
        "write_paused",
        "_drain_waiter",
    )

    def __init__(
        self,
        limit: int = READ_SIZE,
        connected: Callable[[Channel], None] | None = None,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        # Set when connected. Kept because asking asyncio for the running loop costs a
        # getpid() system call each time (its check for a forked child).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.buf = bytearray()
        self.limit = limit
        self.eof = False  # the peer sent FIN, or the connection is gone
        self.lost = False  # the connection is gone
        # Called once at the end of input (the client watch), instead of waking a reader.
        self.on_eof: Callable[[], None] | None = None
        self._connected = connected
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None  # loop time; None: waits are unbounded
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.expired = False
        self._read_paused = False
        # The transport's write buffer is over its high-water mark (64 KiB by default
        # on both loops): whoever feeds this channel should wait (drain) or pause.
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ protocol side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports implement the interface without
        # subclassing asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()
        if self._connected is not None:
            self._connected(self)

    def data_received(self, data: bytes | memoryview) -> None:
        self.buf += data
        if len(self.buf) > self.limit and self.transport is not None:
            self.transport.pause_reading()
            self._read_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._ended()
        # Keep the transport: a client that half-closed after its request still reads
        # the response (the same choice asyncio's streams make).
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ended()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _ended(self) -> None:
        self._wake()
        if self.on_eof is not None:
            self.on_eof()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _due(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self.current_loop().time() < deadline:
            self._arm(deadline)
            return
        self._deadline = None
        self.expired = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def _arm(self, when: float) -> None:
        self._timer = self.current_loop().call_at(when, self._due)
        self._timer_at = when

    def current_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this channel runs on (set when connected)."""
        loop = self.loop
        assert loop is not None, "a channel is used once connected"
        return loop

    def time(self) -> float:
        """The loop's clock, which deadlines are set in."""
        return self.current_loop().time()

    def current_task(self) -> asyncio.Task[Any]:
        """The task running now (asked of this loop: no system call, see ``loop``)."""
        task = asyncio.current_task(self.current_loop())
        assert task is not None
        return task

    # ------------------------------------------------------------------ caller side

    def expire_at(self, deadline: float | None) -> None:
        """Bound the waits from now on by ``deadline`` (loop time); None lifts the bound."""
        self.expired = False
        self._deadline = deadline
        if deadline is None or self.lost:
            return
        if self._timer is None:
            self._arm(deadline)
        elif deadline < self._timer_at:
            self._timer.cancel()
            self._arm(deadline)

    async def more(self) -> bool:
        """Wait until bytes beyond what ``buf`` holds now arrive; False at end of input.

        Raises TimeoutError once the deadline set by ``expire_at`` has passed.
        """
        if self.expired:
            raise TimeoutError()
        if self.eof:
            return False
        size = len(self.buf)
        self._resume_reading()
        waiter = self._waiter = self.current_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        return len(self.buf) > size

    def take(self, length: int) -> bytes:
        """The first ``length`` bytes of ``buf``, removed from it."""
        data = bytes(self.buf[:length])
        del self.buf[:length]
        if len(self.buf) <= self.limit:
            self._resume_reading()
        return data

    def _resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self.lost:
            raise ConnectionResetError("connection lost")
        if not self.write_paused:
            return
        waiter = self._drain_waiter = self.current_loop().create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    def write_eof(self) -> None:
        """Half-close: our side is done sending, once what is buffered is written."""
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def abort(self) -> None:
        """Drop the connection at once, without flushing what is buffered."""
        self._deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def close(self) -> None:
        """Close after what is buffered is written."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class BufferedChannel(Channel, asyncio.BufferedProtocol):
    """A channel that receives into the shared buffer: for asyncio's selector loop."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return RECEIVE_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(RECEIVE_BUFFER[:nbytes])
