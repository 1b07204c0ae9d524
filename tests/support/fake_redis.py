"""A Redis stand-in for the faults a real redis-server cannot produce on demand.

It reads RESP commands and answers each one after ``delay`` seconds, with ``reply(command)``
(raw bytes, so a test can send anything: a wrong type, a bad integer, half a reply, a
reply far too large) or, by default, what the gateway's scripts expect of a healthy
Redis: ``+PONG`` to PING, ``*2 :0 :1`` to a script, ``:1`` to anything else. ``reset``
closes every connection after the command instead of answering. A real redis-server
(support/redis_server.py) is what the normal path is tested against.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def healthy(command: list[bytes]) -> bytes:
    name = command[0].upper() if command else b""
    if name == b"PING":
        return b"+PONG\r\n"
    if name in (b"EVALSHA", b"EVAL"):
        return b"*2\r\n:0\r\n:1\r\n"
    return b":1\r\n"


def read_command(stream: socketserver.StreamRequestHandler) -> list[bytes] | None:
    line = stream.rfile.readline()
    if not line.startswith(b"*"):
        return None
    parts = []
    for _ in range(int(line[1:])):
        size = int(stream.rfile.readline()[1:])
        parts.append(stream.rfile.read(size + 2)[:-2])
    return parts


@dataclass
class FakeRedis:
    delay: float = 0.0
    reply: Callable[[list[bytes]], bytes] = healthy
    reset: bool = False
    commands: list[list[bytes]] = field(default_factory=list)
    _server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> FakeRedis:
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    try:
                        command = read_command(self)
                    except (OSError, ValueError):
                        return
                    if command is None:
                        return
                    fake.commands.append(command)
                    if fake.delay:
                        time.sleep(fake.delay)
                    if fake.reset:
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                        return
                    try:
                        self.wfile.write(fake.reply(command))
                        self.wfile.flush()
                    except OSError:
                        return

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
