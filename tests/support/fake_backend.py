"""A misbehaving stand-in for llama-server, for faults the real one cannot produce on demand.

It answers the readiness monitor like llama-server (``/health``, ``/props``,
``/v1/models``) and misbehaves on generation requests as its ``mode`` says.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _json(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class FakeBackend:
    """Modes: hang, reset_mid_stream, silent_mid_stream, garbage, slow_head, close_before_head,
    usage_first_then_pause, oversized_answer."""

    def __init__(self, mode: str, delay: float = 1.0, port: int = 0) -> None:
        self.mode = mode
        self.delay = delay
        # Set: /health is read and never answered (alive, but hung).
        self.health_hangs = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.generation_requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        try:
            # shutdown wakes the thread blocked in accept(); close alone does not.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = conn.recv(65536)
            if not piece:
                return None
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
                while len(body) < length:
                    body += conn.recv(65536)
        return head

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    head = self._read_request(conn)
                    if head is None:
                        return
                    path = head.split(b" ")[1]
                    if path == b"/health" and self.health_hangs.is_set():
                        self._stop.wait(60)
                        return
                    if path == b"/health":
                        conn.sendall(_json(b'{"status":"ok"}'))
                    elif path == b"/props":
                        conn.sendall(_json(b'{"total_slots":2}'))
                    elif path == b"/v1/models":
                        conn.sendall(_json(b'{"object":"list","data":[{"id":"fake"}]}'))
                    else:
                        self.generation_requests += 1
                        self._misbehave(conn)
                        return
            except OSError:
                return

    def _misbehave(self, conn: socket.socket) -> None:
        mode = self.mode
        if mode == "hang":
            self._stop.wait(60)
        elif mode == "close_before_head":
            return
        elif mode == "garbage":
            conn.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")
        elif mode == "slow_head":
            time.sleep(self.delay)
            conn.sendall(STREAM_HEAD + _chunk(EVENT) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        elif mode == "reset_mid_stream":
            conn.sendall(STREAM_HEAD + _chunk(EVENT) + _chunk(EVENT))
            time.sleep(0.2)
            # SO_LINGER 0: close sends RST, as a crashed backend would.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "usage_first_then_pause":
            # Anthropic-style: usage in the first event, the rest a while later.
            first = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":3}}}\n\n'
            conn.sendall(STREAM_HEAD + _chunk(first))
            time.sleep(self.delay)
            conn.sendall(
                _chunk(b'event: message_stop\ndata: {"type":"message_stop"}\n\n') + b"0\r\n\r\n"
            )
        elif mode == "oversized_answer":
            # A whole answer announced larger than the gateway buffers (300 MiB).
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 314572800\r\n\r\n" + b'{"data":[' + b" " * 65536
            )
            self._stop.wait(60)
        elif mode == "silent_mid_stream":
            conn.sendall(STREAM_HEAD + _chunk(EVENT))
            self._stop.wait(60)
        else:
            raise ValueError(mode)
