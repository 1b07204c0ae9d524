#!/usr/bin/env python3
"""Health responder for platform probes (RunPod load balancer, Docker HEALTHCHECK).

Any GET or HEAD path on PORT_HEALTH answers from the state the supervisor and gateway
publish in a small file (GATEWAY_STATE_FILE); it never calls llama-server, so a probe can
neither slow inference nor be slowed by it:

    starting, loading  -> 204  (RunPod: initializing; cold start runs from here)
    ready              -> 200
    draining, failed   -> 503

HEALTH_MODE=static answers 200 always. Without a state file (run on its own) it asks the
gateway's /ping on loopback instead, from a thread that keeps the answer fresh.

The port is open to the internet, so one thread runs a selector loop over every
connection, and no connection can take anything from another: each gets one answer and
is closed; the whole request head must arrive within REQUEST_DEADLINE (a byte a second
does not extend it); a head larger than MAX_HEAD is dropped; and when MAX_CONNECTIONS are
open (or the process runs out of descriptors) the oldest is closed to make room for the
newest. A probe is therefore answered as soon as its head arrives, whatever a thousand
half-sent connections are doing.
"""

from __future__ import annotations

import collections
import errno
import http.client
import json
import os
import resource
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable

from gguf_gateway.config import Config, ConfigError
from gguf_gateway.readiness import PROBE_STATUS

REQUEST_DEADLINE = 2.0  # seconds from accept to a complete request head
# After the answer, what the client still sends is read and dropped for this long. Equal to
# REQUEST_DEADLINE, so the open connections stay in deadline order (the expiry sweep and
# the eviction of the oldest rely on it).
LINGER_SECONDS = REQUEST_DEADLINE
MAX_HEAD = 8192
MAX_CONNECTIONS = 4096
BACKLOG = 1024
REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def read_state(state_file: str) -> str:
    try:
        with open(state_file, encoding="ascii") as handle:
            return handle.read().strip() or "starting"
    except FileNotFoundError:
        return "starting"
    except (OSError, UnicodeDecodeError):
        return "failed"


def gateway_state(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", "/ping")
        return "ready" if conn.getresponse().status == 200 else "loading"
    except OSError:
        return "starting"
    finally:
        conn.close()


class GatewayWatch:
    """The gateway's state, asked every half second from a thread of its own, so that a
    slow gateway never holds up the loop that answers probes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.state = "starting"
        threading.Thread(target=self._run, name="gateway-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.state = gateway_state(self.port)
            time.sleep(0.5)


def probe_answer(method: str, state: str) -> bytes:
    """The whole response to one probe: status from the state, no body for 204 or HEAD."""
    status = PROBE_STATUS.get(state, 503)
    body = b"" if status == 204 else json.dumps({"status": state}).encode()
    return response(status, body, with_body=method == "GET")


def response(status: int, body: bytes, with_body: bool, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\n"
        "Server: llama-gguf-inference-health\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        f"{extra}"
    )
    if status != 204:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("ascii") + (body if with_body else b"")


def answer_to(head: bytes, state: Callable[[], str]) -> bytes:
    """The response to a complete request head (only its request line matters)."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1]:
        return response(400, b'{"error": "bad request line"}', with_body=True)
    method = parts[0].decode("ascii", "replace")
    if method not in ("GET", "HEAD"):
        body = b'{"error": "probes use GET or HEAD"}'
        return response(405, body, with_body=method != "HEAD", extra="Allow: GET, HEAD\r\n")
    return probe_answer(method, state())


class Connection:
    __slots__ = ("sock", "deadline", "head", "closing")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.head = bytearray()
        self.closing = False  # answered: only reading (and dropping) what is left


class HealthResponder:
    """One thread, one selector: accept, read a head, answer, close."""

    def __init__(self, listener: socket.socket, state: Callable[[], str]) -> None:
        self.listener = listener
        self.state = state
        self.selector = selectors.DefaultSelector()
        # Insertion order is deadline order (every deadline is "now + a constant"), so the
        # expired ones are always at the front.
        self.open: collections.OrderedDict[int, Connection] = collections.OrderedDict()
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ)

    def serve_forever(self) -> None:
        while True:
            self.serve_once()

    def serve_once(self, timeout: float = 0.25) -> None:
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.listener:
                self._accept()
            else:
                conn = self.open.get(key.fd)
                if conn is not None:
                    self._read(conn)
        self._expire(time.monotonic())

    def _accept(self) -> None:
        for _ in range(256):  # a burst, then the open connections get their turn
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the oldest connection makes room for this one.
                    if not self.open:
                        return
                    self._close(next(iter(self.open.values())))
                    continue
                return  # ECONNABORTED and the like: that connection is gone already
            if len(self.open) >= MAX_CONNECTIONS:
                self._close(next(iter(self.open.values())))
            sock.setblocking(False)
            conn = Connection(sock, time.monotonic() + REQUEST_DEADLINE)
            self.open[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ)

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if conn.closing:
            return  # dropped: the answer is out, the client's FIN or the deadline ends it
        conn.head += data
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            end = conn.head.find(b"\n\n")
        if end < 0:
            if len(conn.head) > MAX_HEAD:
                self._close(conn)
            return
        self._answer(conn, answer_to(bytes(conn.head[:end]), self.state))

    def _answer(self, conn: Connection, data: bytes) -> None:
        try:
            # Small enough for any socket buffer; a peer that will not take it loses it.
            conn.sock.send(data)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        # Closing with unread input would reset the connection and could destroy the
        # answer in flight: read until the client closes, for a short while.
        conn.closing = True
        conn.head = bytearray()
        self.open.pop(conn.sock.fileno(), None)
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self.open[conn.sock.fileno()] = conn

    def _expire(self, now: float) -> None:
        while self.open:
            conn = next(iter(self.open.values()))
            if conn.deadline > now:
                return
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        self.open.pop(fd, None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()


def raise_descriptor_limit() -> None:
    """As many descriptors as the container allows: each open connection holds one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + 64
    if hard == resource.RLIM_INFINITY or hard >= wanted:
        target = max(soft, wanted)
    else:
        target = hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def probe() -> int:
    """The image's HEALTHCHECK: ask the probe port, wherever the settings put it."""
    try:
        port = Config.from_env().port_health
    except ConfigError as exc:
        print(f"health: {exc}", file=sys.stderr)
        return 1
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=4)
    try:
        conn.request("GET", "/ping")
        status = conn.getresponse().status
    except OSError as exc:
        print(f"health: 127.0.0.1:{port}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    return 0 if status in (200, 204) else 1


def main() -> int:
    # Host and ports as the gateway reads them (one set of rules, in config.py).
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"health: configuration error: {exc}", file=sys.stderr)
        return 2
    mode = os.environ.get("HEALTH_MODE", "").strip().lower() or "ready"
    if mode not in ("ready", "static"):
        print(f"health: HEALTH_MODE={mode!r}: expected ready or static", file=sys.stderr)
        return 2
    state_file = os.environ.get("GATEWAY_STATE_FILE", "").strip()
    state: Callable[[], str]
    if mode == "static":
        state = lambda: "ready"  # noqa: E731
    elif state_file:
        state = lambda: read_state(state_file)  # noqa: E731
    else:
        watch = GatewayWatch(config.port)
        state = lambda: watch.state  # noqa: E731
    raise_descriptor_limit()
    try:
        listener = listen(config.host, config.port_health)
    except OSError as exc:
        print(
            f"health: cannot listen on {config.host}:{config.port_health} ({exc.strerror}): "
            "is PORT_HEALTH in use?",
            file=sys.stderr,
        )
        return 2
    try:
        HealthResponder(listener, state).serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(probe() if sys.argv[1:] == ["--probe"] else main())
