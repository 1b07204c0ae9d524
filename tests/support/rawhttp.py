"""A raw-socket HTTP client for tests that must send bytes no library would send."""

from __future__ import annotations

import json
import socket
import time


def exchange(
    port: int, data: bytes, timeout: float = 5.0, chunks: list[bytes] | None = None
) -> tuple[bytes, bool]:
    """Send ``data`` (or ``chunks`` one by one), read until the server closes.

    Returns everything received and whether the server closed the connection before the
    timeout.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for piece in chunks if chunks is not None else [data]:
            sock.sendall(piece)
        received = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data_in = sock.recv(65536)
            except TimeoutError:
                return bytes(received), False
            except ConnectionResetError:
                return bytes(received), True
            if not data_in:
                return bytes(received), True
            received += data_in
        return bytes(received), False


def status_of(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) < 2 or not parts[1].isdigit():
        raise AssertionError(f"no status line in {response[:200]!r}")
    return int(parts[1])


def one_response(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read exactly one Content-Length-framed response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            piece = sock.recv(65536)
            if not piece:
                return received
            received += piece
        head, _, body = received.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
        return head + b"\r\n\r\n" + body


def held_stream(port: int, key: str, timeout: float) -> socket.socket:
    """A chat stream that keeps its slot busy until its socket is closed.

    Only the status line is read: the stream then stalls on backpressure and the request
    stays open. ignore_eos: a random model may end on EOS at once, and the stream with it.
    """
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 100000,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n"
        f"Authorization: Bearer {key}\r\n\r\n"
    ).encode()
    held = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        held.sendall(head + body)
        assert held.recv(4096).startswith(b"HTTP/1.1 200")
    except BaseException:
        held.close()
        raise
    return held
