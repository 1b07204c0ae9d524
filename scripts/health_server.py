#!/usr/bin/env python3
"""Health responder for platform probes (RunPod load balancer, Docker HEALTHCHECK).

Any GET or HEAD path on PORT_HEALTH answers from the state the supervisor and gateway
publish in a small file (GATEWAY_STATE_FILE); it never calls llama-server, so a probe can
neither slow inference nor be slowed by it:

    starting, loading  -> 204  (RunPod: initializing; cold start runs from here)
    ready              -> 200
    draining, failed   -> 503

HEALTH_MODE=static answers 200 always. Without a state file (run on its own) it asks the
gateway's /ping on loopback instead.

The port is open to the internet: every connection gets one answer and is closed, a
connection that sends no complete request within CONNECTION_TIMEOUT is dropped, the
listen backlog is deep, and at most MAX_THREADS connections are handled at once (beyond
that a connection is closed unanswered), so idle or half-sent connections cannot keep a
probe waiting.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gguf_gateway.config import Config, ConfigError
from gguf_gateway.readiness import PROBE_STATUS

CONNECTION_TIMEOUT = 2.0
MAX_THREADS = 1024


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


class HealthHandler(BaseHTTPRequestHandler):
    server_version = "llama-gguf-inference-health"
    protocol_version = "HTTP/1.1"
    timeout = CONNECTION_TIMEOUT  # applied to the socket: an idle client is dropped
    static = False
    state_file = ""
    gateway_port = 8000

    def _answer(self, with_body: bool) -> None:
        if self.static:
            state = "ready"
        elif self.state_file:
            state = read_state(self.state_file)
        else:
            state = gateway_state(self.gateway_port)
        status = PROBE_STATUS.get(state, 503)
        body = b"" if status == 204 else json.dumps({"status": state}).encode()
        # One answer per connection: a body a client announced is never read.
        self.close_connection = True
        self.send_response(status)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body and body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(with_body=False)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # Probes arrive every few seconds; logging each would bury everything else.
        return


class HealthServer(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_THREADS)
        super().__init__(address, HealthHandler)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


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
    HealthHandler.static = mode == "static"
    HealthHandler.state_file = os.environ.get("GATEWAY_STATE_FILE", "").strip()
    HealthHandler.gateway_port = config.port
    try:
        server = HealthServer((config.host, config.port_health))
    except OSError as exc:
        print(
            f"health: cannot listen on {config.host}:{config.port_health} ({exc.strerror}): "
            "is PORT_HEALTH in use?",
            file=sys.stderr,
        )
        return 2
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(probe() if sys.argv[1:] == ["--probe"] else main())
