"""A stand-in for the Hugging Face Hub: the calls a GGUF download makes, on loopback.

Answers ``api/models/<repo>/revision/<rev>`` (commit and file list), ``api/models/<repo>/
tree/<commit>?recursive=true`` (sizes, SHA-256) and ``<repo>/resolve/<commit>/<path>``
(the bytes, with ETag, Accept-Ranges and 206 for ``Range: bytes=a-b`` / ``a-``). A gated repo
wants ``Authorization: Bearer <token>`` (401 without, 403 with another). It records every
request and how many body bytes each transfer actually wrote.

It can shape and break transfers the way real networks do: a byte-rate cap per connection
and one on all transfers together (token buckets), a delay before the first byte, a stall or
a dropped connection on chosen transfers, a server that ignores Range, a listing that lies
about a size. With ``tls`` it speaks https and plain http on the same port (it peeks at the
first byte), so a redirect from https to http on the same host and port can be tested.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BLOCK = 64 * 1024


@dataclass(frozen=True)
class FileOnDisk:
    """A large file served from disk (the bench's 1 GiB), with its digest known beforehand."""

    path: Path
    size: int
    sha256: str

    def read(self, start: int, count: int) -> bytes:
        with open(self.path, "rb") as handle:
            return os.pread(handle.fileno(), count, start)


Data = bytes | FileOnDisk


@dataclass
class HubRepo:
    files: Mapping[str, Data]
    gated: bool = False
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    # A hostile Hub: the LFS digest listed for a file, instead of the file's own.
    oids: dict[str, str] = field(default_factory=dict)
    # Sizes the tree lists instead of the true ones (a lying or stale listing).
    listed_sizes: dict[str, int] = field(default_factory=dict)
    # Raw bytes answered for the tree listing instead of the JSON (a hostile Hub).
    raw_tree: bytes | None = None


def _size(data: Data) -> int:
    return data.size if isinstance(data, FileOnDisk) else len(data)


def _sha256(data: Data) -> str:
    return data.sha256 if isinstance(data, FileOnDisk) else hashlib.sha256(data).hexdigest()


class _Bucket:
    """A byte-rate cap: each block waits for its turn on a virtual clock."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next = 0.0
        self.lock = threading.Lock()

    def take(self, count: int) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + count / self.rate
        if start > now:
            time.sleep(start - now)


@dataclass(frozen=True)
class Transfer:
    """One resolve GET's body: which file, the range asked for, the bytes really written."""

    key: str
    start: int
    end: int  # exclusive, as answered
    sent: int
    tls: bool
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, HubRepo]
    token: str = "hf_test_token_with_access"
    cut_first_transfer: bool = False
    # Seconds to sleep between 64 KiB blocks of a transfer (to watch a download go).
    pace: float = 0.0
    # Shaping: bytes/s per connection and for all transfers together (0: no cap), and the
    # delay before a transfer's first byte.
    connection_rate: float = 0.0
    total_rate: float = 0.0
    first_byte_delay: float = 0.0
    # Faults by the resolve GET's ordinal (0, 1, ...): stop sending half-way and hold the
    # connection open, or close it half-way.
    stall: set[int] = field(default_factory=set)
    drop: set[int] = field(default_factory=set)
    ignore_range: bool = False
    block: int = BLOCK  # bytes per write (the shaping's grain)
    # https (and plain http on the same port); downgrade: resolve under https redirects to
    # the same URL over http.
    tls: ssl.SSLContext | None = None
    downgrade: bool = False
    # The Hub's resolve answers 302 to this base URL + the same path (a CDN); as the CDN,
    # the resolve GETs whose ordinals are in ``expire`` answer 403 (a signed URL expired).
    redirect_to: str | None = None
    expire: set[int] = field(default_factory=set)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    max_active: int = 0  # the most resolve GETs sending at once
    _active: int = 0
    _cut: set[str] = field(default_factory=set)
    _server: ThreadingHTTPServer | None = None
    _ordinal: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _total: _Bucket | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> FakeHub:
        hub = self
        self._total = _Bucket(self.total_rate)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

            def do_HEAD(self) -> None:  # noqa: N802
                hub.answer(self, with_body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub.answer(self, with_body=True)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

            def get_request(self) -> tuple[socket.socket, object]:
                sock, address = super().get_request()
                if hub.tls is not None:
                    sock.settimeout(10)
                    try:
                        first = sock.recv(1, socket.MSG_PEEK)
                    except OSError:
                        first = b""
                    sock.settimeout(None)
                    if first == b"\x16":  # a TLS handshake record
                        sock = hub.tls.wrap_socket(sock, server_side=True)
                return sock, address

            def handle_error(self, request: object, client_address: object) -> None:
                return  # a client that went away (a killed download) is not an error here

        self._server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until no transfer is sending (those of a killed client notice and end)."""
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.02)

    def sent(self, key: str | None = None) -> int:
        """Body bytes written for resolve GETs (of one repo/path), over the whole run."""
        return sum(t.sent for t in list(self.transfers) if key is None or t.key == key)

    def _json(self, handler: BaseHTTPRequestHandler, status: int, data: object) -> None:
        body = json.dumps(data).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def answer(self, handler: BaseHTTPRequestHandler, with_body: bool) -> None:
        path = urllib.parse.urlsplit(handler.path).path
        self.requests.append((handler.command, handler.path, dict(handler.headers)))
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        name = "/".join(parts[2:4] if api else parts[:2])
        repo = self.repos.get(name)
        if repo is None:
            return self._json(handler, 404, {"error": "Repository not found"})
        if repo.gated:
            sent = handler.headers.get("Authorization")
            if sent is None:
                return self._json(handler, 401, {"error": "Access to this repo is restricted"})
            if sent != f"Bearer {self.token}":
                return self._json(handler, 403, {"error": "not authorized"})
        rest = parts[4:] if api else parts[2:]
        if api and (not rest or rest[0] == "revision"):
            siblings = [{"rfilename": f} for f in repo.files]
            return self._json(handler, 200, {"id": name, "sha": repo.commit, "siblings": siblings})
        if api and rest[:1] == ["tree"] and repo.raw_tree is not None:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(repo.raw_tree)))
            handler.end_headers()
            handler.wfile.write(repo.raw_tree)
            return None
        if api and rest[:1] == ["tree"]:
            tree = [
                {
                    "type": "file",
                    "path": f,
                    "size": repo.listed_sizes.get(f, _size(data)),
                    "oid": _sha256(data)[:40],
                    "lfs": {"oid": repo.oids.get(f, _sha256(data)), "size": _size(data)},
                }
                for f, data in repo.files.items()
            ]
            return self._json(handler, 200, tree)
        if not api and rest[:1] == ["resolve"] and len(rest) >= 3:
            file = "/".join(rest[2:])
            if file not in repo.files:
                return self._json(handler, 404, {"error": "Entry not found"})
            tls = isinstance(handler.connection, ssl.SSLSocket)
            if self.redirect_to is not None:
                handler.send_response(302)
                handler.send_header("Location", f"{self.redirect_to}{handler.path}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            if self.downgrade and tls:
                handler.send_response(302)
                handler.send_header("Location", f"http://127.0.0.1:{self.port}{handler.path}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.commit = repo.commit  # type: ignore[attr-defined]
            return self._send_file(handler, name + "/" + file, repo.files[file], with_body, tls)
        return self._json(handler, 404, {"error": "unknown call"})

    def _hold(self, sock: socket.socket) -> None:
        """Send nothing more, keeping the connection open until the client gives up on it."""
        sock.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                if not sock.recv(1024):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def _range(self, header: str, size: int) -> tuple[int, int] | None:
        """(start, end exclusive) for ``bytes=a-b`` or ``bytes=a-``; None: the whole file."""
        if self.ignore_range or not header.startswith("bytes="):
            return None
        first, _, last = header[6:].partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        start = int(first)
        end = min(int(last) + 1, size) if last else size
        return start, end

    def _send_file(
        self,
        handler: BaseHTTPRequestHandler,
        key: str,
        data: Data,
        with_body: bool,
        tls: bool,
    ) -> None:
        size = _size(data)
        asked = self._range(handler.headers.get("Range", ""), size)
        start, end = asked or (0, size)
        if start >= size or start >= end:
            handler.send_response(416)
            handler.send_header("Content-Range", f"bytes */{size}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        with self._lock:
            ordinal = self._ordinal
            if with_body:
                self._ordinal += 1
            expired = with_body and ordinal in self.expire
            if with_body and not expired:
                self._active += 1
                self.max_active = max(self.max_active, self._active)
        if expired:
            return self._json(handler, 403, {"error": "Request has expired"})
        try:
            self._send_body(handler, key, data, with_body, tls, ordinal, asked, start, end)
        finally:
            if with_body and not expired:
                with self._lock:
                    self._active -= 1

    def _send_body(
        self,
        handler: BaseHTTPRequestHandler,
        key: str,
        data: Data,
        with_body: bool,
        tls: bool,
        ordinal: int,
        asked: tuple[int, int] | None,
        start: int,
        end: int,
    ) -> None:
        size = _size(data)
        if self.first_byte_delay:
            time.sleep(self.first_byte_delay)
        handler.send_response(206 if asked else 200)
        handler.send_header("ETag", f'"{_sha256(data)}"')
        handler.send_header("X-Repo-Commit", getattr(handler, "commit", ""))
        handler.send_header("Accept-Ranges", "none" if self.ignore_range else "bytes")
        handler.send_header("Content-Length", str(end - start))
        if asked:
            handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        handler.end_headers()
        if not with_body:
            return
        limit = end
        if self.cut_first_transfer and key not in self._cut:
            self._cut.add(key)
            limit = start + (end - start) // 2
        faulty = ordinal in self.stall or ordinal in self.drop
        if faulty:
            limit = start + (end - start) // 2
        # One cap per connection, across the requests it carries (keep-alive).
        conn_bucket = getattr(handler, "bucket", None)
        if conn_bucket is None:
            conn_bucket = _Bucket(self.connection_rate)
            setattr(handler, "bucket", conn_bucket)
        sent = 0
        try:
            offset = start
            while offset < limit:
                count = min(self.block, limit - offset)
                conn_bucket.take(count)
                if self._total is not None:
                    self._total.take(count)
                if isinstance(data, FileOnDisk):
                    handler.wfile.write(data.read(offset, count))
                else:
                    handler.wfile.write(data[offset : offset + count])
                sent += count
                offset += count
                if self.pace:
                    threading.Event().wait(self.pace)
            if ordinal in self.stall:
                handler.wfile.flush()
                self._hold(handler.connection)
        except OSError:
            pass  # the client went away (or cut this stalled transfer itself)
        finally:
            self.transfers.append(
                Transfer(key, start, end, sent, tls, handler.headers.get("Authorization"))
            )
        if limit < end:
            handler.close_connection = True
