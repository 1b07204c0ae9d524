"""A stand-in for the Hugging Face Hub: the calls a GGUF download makes, on loopback.

Answers ``api/models/<repo>/revision/<rev>`` (commit and file list), ``api/models/<repo>/
tree/<commit>?recursive=true`` (sizes, SHA-256) and ``<repo>/resolve/<commit>/<path>``
(the bytes, with ETag, Accept-Ranges and 206 for a Range). A gated repo wants
``Authorization: Bearer <token>`` (401 without, 403 with another). It can cut the first
transfer of each file half-way, to test resuming, and it records every request.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class HubRepo:
    files: dict[str, bytes]
    gated: bool = False
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    # A hostile Hub: the LFS digest listed for a file, instead of the file's own.
    oids: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeHub:
    repos: dict[str, HubRepo]
    token: str = "hf_test_token_with_access"
    cut_first_transfer: bool = False
    # Seconds to sleep between 64 KiB blocks of a transfer (to watch a download go).
    pace: float = 0.0
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    _cut: set[str] = field(default_factory=set)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

            def do_HEAD(self) -> None:  # noqa: N802
                hub.answer(self, with_body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub.answer(self, with_body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

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
        if api and rest[:1] == ["tree"]:
            tree = [
                {
                    "type": "file",
                    "path": f,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                    "lfs": {
                        "oid": repo.oids.get(f, hashlib.sha256(data).hexdigest()),
                        "size": len(data),
                    },
                }
                for f, data in repo.files.items()
            ]
            return self._json(handler, 200, tree)
        if not api and rest[:1] == ["resolve"] and len(rest) >= 3:
            file = "/".join(rest[2:])
            if file not in repo.files:
                return self._json(handler, 404, {"error": "Entry not found"})
            return self._send_file(handler, name + "/" + file, repo.files[file], with_body)
        return self._json(handler, 404, {"error": "unknown call"})

    def _send_file(
        self, handler: BaseHTTPRequestHandler, key: str, data: bytes, with_body: bool
    ) -> None:
        start = 0
        ranged = handler.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged[6:-1])
            if start >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
        handler.send_response(206 if start else 200)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if not with_body:
            return
        payload = data[start:]
        if self.cut_first_transfer and key not in self._cut:
            self._cut.add(key)
            handler.wfile.write(payload[: len(payload) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        for offset in range(0, len(payload), 65536):
            handler.wfile.write(payload[offset : offset + 65536])
            if self.pace:
                threading.Event().wait(self.pace)
