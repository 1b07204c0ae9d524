"""scripts/health_server.py on its own, against floods of slow and half-sent connections."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.procs import SCRIPTS, Process, answers, free_port, http_get, wait_until

FLOOD = 1100  # more than the 1,024 threads the responder once had


class Responder:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.state = tmp_path / "state"
        self.state.write_text("ready\n")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOST": "127.0.0.1",
            "PORT": str(free_port()),
            "PORT_HEALTH": str(self.port),
            "GATEWAY_STATE_FILE": str(self.state),
        }
        self.proc = Process(
            [sys.executable, str(SCRIPTS / "health_server.py")], env, tmp_path / "health.log"
        )


@pytest.fixture
def responder(tmp_path: Path) -> Iterator[Responder]:
    server = Responder(tmp_path)
    server.proc.start()
    try:
        wait_until(lambda: answers(server.port, "/ping"), 10, "the health responder")
        yield server
    finally:
        server.proc.stop()


class Slowloris:
    """FLOOD connections, each sending one byte of a request head a second and never
    finishing it; one the responder closes is opened again at once. Stops by itself."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port, self.seconds = port, seconds
        self.socks: list[socket.socket | None] = [None] * FLOOD
        self.reopened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.setblocking(False)
            self.socks[i] = sock
        except OSError:
            self.socks[i] = None

    def _run(self) -> None:
        for i in range(FLOOD):
            self._open(i)
        ends = time.monotonic() + self.seconds
        while not self.stop.wait(1.0) and time.monotonic() < ends:
            for i, sock in enumerate(self.socks):
                try:
                    if sock is None:
                        raise OSError
                    sock.send(b"G")
                    if sock.recv(1024) == b"":
                        raise OSError
                except BlockingIOError:
                    continue  # still open, nothing to read: as intended
                except OSError:
                    if sock is not None:
                        sock.close()
                    self.reopened += 1
                    self._open(i)

    def held(self) -> int:
        return sum(1 for sock in self.socks if sock is not None)

    def __enter__(self) -> Slowloris:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        for sock in self.socks:
            if sock is not None:
                sock.close()


def test_probes_are_answered_while_a_thousand_connections_trickle_bytes(
    responder: Responder,
) -> None:
    with Slowloris(responder.port, seconds=20) as flood:
        wait_until(lambda: flood.held() >= FLOOD - 10, 30, "the flood to connect")
        latencies = []
        for state, status in [("ready", 200), ("loading", 204), ("draining", 503)] * 2:
            responder.state.write_text(state + "\n")
            started = time.monotonic()
            # A generous client deadline: the responder's answer, not the CPU, is tested.
            assert http_get(responder.port, "/ping", timeout=10)[0] == status
            latencies.append(time.monotonic() - started)
            assert flood.held() >= FLOOD - 50  # the flood is still there
        wait_until(lambda: flood.reopened > 0, 30, "a trickling connection to be cut")
    print(f"probe latency under {FLOOD} trickling connections: max {max(latencies):.3f}s")


def test_a_connection_trickling_a_byte_a_second_is_cut_at_the_request_deadline(
    responder: Responder,
) -> None:
    with socket.create_connection(("127.0.0.1", responder.port), timeout=2) as sock:
        sock.settimeout(0.5)
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 30:
            try:
                sock.send(b"G")
                if sock.recv(100) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        # The whole head had 2 s; each byte does not buy more time.
        assert closed, "a connection sending a byte every half second was never closed"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        pytest.param(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n", b"200", id="get"),
        pytest.param(b"HEAD / HTTP/1.0\r\n\r\n", b"200", id="head"),
        pytest.param(b"GET /x HTTP/1.1\n\n", b"200", id="bare-lf"),
        pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"405", id="post"),
        pytest.param(b"garbage\r\n\r\n", b"400", id="garbage"),
    ],
)
def test_every_request_gets_one_answer_then_the_connection_closes(
    responder: Responder, request_bytes: bytes, status: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", responder.port), timeout=5) as sock:
        sock.sendall(request_bytes)
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
    assert got.startswith(b"HTTP/1.1 " + status), got
    assert b"Connection: close" in got


def test_an_oversized_head_is_dropped(responder: Responder) -> None:
    with socket.create_connection(("127.0.0.1", responder.port), timeout=5) as sock:
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
    assert answers(responder.port, "/ping")
