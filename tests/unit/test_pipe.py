"""The stream pipe on real sockets and both event loops: relay, end, and llama-server's close."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gguf_gateway.channel import Channel, channel_type
from gguf_gateway.http11 import LAST_CHUNK, chunk
from gguf_gateway.pipe import PipeEvent, StreamPipe, stream_pipe_type
from gguf_gateway.sse import UsageTally
from support.loops import LOOPS, run

EVENTS = [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'] * 3


async def client_channel() -> tuple[Channel, socket.socket]:
    ours, theirs = socket.socketpair()
    kind = channel_type()
    _, channel = await asyncio.get_running_loop().connect_accepted_socket(kind, ours)
    return channel, theirs


async def piped(client: Channel, conceal: bool = False) -> tuple[StreamPipe, socket.socket]:
    """A pipe reading from a stand-in llama-server (the returned socket) to ``client``."""
    ours, llama = socket.socketpair()
    pipe = stream_pipe_type(client)(
        client, decode=False, tally=UsageTally(), strip_usage=False, conceal=conceal
    )
    await asyncio.get_running_loop().connect_accepted_socket(lambda: pipe, ours)
    return pipe, llama


def close_all(pipe: StreamPipe, client: Channel, *peers: socket.socket) -> None:
    """Drop both connections of a finished pipe and the test's own socket ends."""
    assert pipe.backend is not None
    pipe.backend.abort()
    client.abort()
    for sock in peers:
        sock.close()


def received(peer: socket.socket, size: int) -> bytes:
    peer.settimeout(5)
    got = b""
    while len(got) < size:
        got += peer.recv(65536)
    return got


@pytest.mark.parametrize("closes", [True, False], ids=["llama-server-closes", "kept-open"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_stream_is_relayed_as_is_and_a_close_after_it_is_noticed(
    loop_name: str, closes: bool
) -> None:
    """llama-server closes its end after every stream, often in the same moment as the last
    chunk: the pipe notes it, so the connection is not handed back to the pool."""

    async def body() -> None:
        client, reader = await client_channel()
        pipe, llama = await piped(client)
        stream = b"".join(chunk(event) for event in EVENTS) + LAST_CHUNK
        llama.sendall(stream)
        if closes:
            llama.shutdown(socket.SHUT_WR)
        assert await pipe.next_event() is PipeEvent.DONE
        await asyncio.sleep(0.05)  # the close, if any, arrives
        assert pipe.backend_closed is closes
        assert received(reader, len(stream)) == stream and pipe.sent == len(stream)
        close_all(pipe, client, reader, llama)

    run(loop_name, body)
