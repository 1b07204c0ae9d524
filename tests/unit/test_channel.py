"""Channels on real sockets and both event loops: reads, end of input, deadlines, watch."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gguf_gateway.channel import BufferedChannel, Channel, channel_type
from gguf_gateway.client import ClientConnection
from gguf_gateway.http11 import Limits
from support.loops import LOOPS, run


async def connected(limit: int = 65536) -> tuple[Channel, socket.socket]:
    ours, theirs = socket.socketpair()
    kind = channel_type()
    _, channel = await asyncio.get_running_loop().connect_accepted_socket(lambda: kind(limit), ours)
    return channel, theirs


@pytest.mark.parametrize("loop_name", LOOPS)
def test_channel_type_follows_the_loop(loop_name: str) -> None:
    async def body() -> None:
        channel, peer = await connected()
        assert isinstance(channel, BufferedChannel) == (loop_name == "asyncio")
        channel.abort()
        peer.close()

    run(loop_name, body)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_more_appends_what_arrives_and_reports_end_of_input(loop_name: str) -> None:
    async def body() -> None:
        channel, peer = await connected()
        peer.sendall(b"hello ")
        while len(channel.buf) < 6:
            assert await channel.more()
        peer.sendall(b"world")
        while len(channel.buf) < 11:
            assert await channel.more()
        assert channel.take(6) == b"hello " and bytes(channel.buf) == b"world"
        peer.shutdown(socket.SHUT_WR)
        assert not await channel.more()
        assert channel.eof and not await channel.more()
        channel.abort()
        peer.close()

    run(loop_name, body)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_deadline_times_out_a_wait_and_can_be_lifted(loop_name: str) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        channel, peer = await connected()
        channel.expire_at(loop.time() + 0.05)
        with pytest.raises(TimeoutError):
            await channel.more()
        # A new deadline clears the expiry; a lifted one lets the wait finish.
        channel.expire_at(None)
        loop.call_later(0.1, peer.sendall, b"x")
        assert await channel.more()
        channel.abort()
        peer.close()

    run(loop_name, body)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_deadline_moved_later_rearms_and_moved_earlier_fires_early(loop_name: str) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        channel, peer = await connected()
        channel.expire_at(loop.time() + 0.05)
        channel.expire_at(loop.time() + 0.3)  # the first timer fires early and re-arms
        started = loop.time()
        with pytest.raises(TimeoutError):
            await channel.more()
        assert loop.time() - started >= 0.25
        channel.expire_at(loop.time() + 30)
        channel.expire_at(loop.time() + 0.05)  # earlier: the timer is replaced
        started = loop.time()
        with pytest.raises(TimeoutError):
            await channel.more()
        assert loop.time() - started < 10
        channel.abort()
        peer.close()

    run(loop_name, body)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_reading_pauses_over_the_limit_and_resumes_when_taken(loop_name: str) -> None:
    async def body() -> None:
        channel, peer = await connected(limit=1000)
        peer.setblocking(False)
        sent = 0
        # Fill the socket until the kernel's buffers are full: the channel, paused after
        # its first read, takes no more.
        for _ in range(200):
            try:
                while sent < 8_000_000:
                    sent += peer.send(b"y" * 65536)
            except BlockingIOError:
                pass
            await asyncio.sleep(0.005)
        held = len(channel.buf)
        assert 1000 < held < sent  # paused: the rest waits in the socket
        channel.take(held)
        while len(channel.buf) == 0:
            assert await channel.more()
        channel.abort()
        peer.close()

    run(loop_name, body)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_watch_cancels_the_request_when_the_client_leaves(loop_name: str) -> None:
    async def body() -> None:
        channel, peer = await connected()
        conn = ClientConnection(channel, Limits())

        async def request() -> str:
            watch = conn.watch()
            try:
                await asyncio.sleep(30)
                return "finished"
            except asyncio.CancelledError:
                return "cancelled" if watch.gone else "other"
            finally:
                watch.stop()

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        peer.close()
        assert await asyncio.wait_for(task, 5) == "cancelled"
        channel.abort()

    run(loop_name, body)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_read_head_times_out_a_trickled_head(loop_name: str) -> None:
    async def body() -> None:
        channel, peer = await connected()
        conn = ClientConnection(channel, Limits())
        peer.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        with pytest.raises(TimeoutError):
            await conn.read_head(first_wait=5, head_timeout=0.1)
        channel.abort()
        peer.close()

    run(loop_name, body)
