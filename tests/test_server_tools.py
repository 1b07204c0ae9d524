"""llama-server's own tools behind the gateway, once ALLOW_SERVER_TOOLS lets admins use them.

Off, they are 403 as llama-server answers (test_routes.py); on, the headers llama-server's
tools act on travel with the request, and nothing else of the client's head does.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ALICE, BACKEND_KEY, OPS, gateway_env
from support.procs import start_gateway, start_llama_server


def post(
    port: int, path: str, body: dict[str, object], headers: dict[str, str]
) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST", path, json.dumps(body), {"Content-Type": "application/json", **headers}
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def tools_gateway(
    model_file: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    logs = tmp_path_factory.mktemp("tools")
    backend, backend_port = start_llama_server(
        model_file,
        logs / "llama-server.log",
        api_key=BACKEND_KEY,
        parallel=1,
        extra=["--tools", "read_file", "--ui-mcp-proxy"],
    )
    env = gateway_env(backend_port, keys_file)
    env["ALLOW_SERVER_TOOLS"] = "true"
    try:
        gateway, port = start_gateway(env, logs / "gateway.log")
        try:
            yield port
        finally:
            gateway.stop()
    finally:
        backend.stop()


def test_a_tools_working_directory_header_reaches_llama_server(
    tools_gateway: int, tmp_path: Path
) -> None:
    (tmp_path / "marker.txt").write_text("found through the gateway\n")
    call: dict[str, object] = {"tool": "read_file", "params": {"path": "marker.txt"}}
    admin = {"Authorization": f"Bearer {OPS}"}
    status, answer = post(tools_gateway, "/tools", call, {**admin, "x-tool-cwd": str(tmp_path)})
    assert status == 200, answer
    assert "found through the gateway" in str(answer.get("plain_text_response")), answer
    # Without the header llama-server looks in its own directory, where there is none.
    status, answer = post(tools_gateway, "/tools", call, admin)
    assert status == 200 and "error" in answer, answer
    # Still an admin's feature.
    inference = {"Authorization": f"Bearer {ALICE}", "x-tool-cwd": str(tmp_path)}
    assert post(tools_gateway, "/tools", call, inference)[0] == 403


def test_the_cors_proxy_passes_only_the_headers_named_for_it(tools_gateway: int) -> None:
    seen: dict[str, str] = {}

    class Capture(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.update({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    target = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=target.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", tools_gateway, timeout=30)
        url = f"http://127.0.0.1:{target.server_port}/capture"
        conn.request(
            "GET",
            f"/cors-proxy?url={url}",
            headers={
                "Authorization": f"Bearer {OPS}",
                "Cookie": "session=secret",
                "x-llama-server-proxy-header-accept": "application/json",
                "x-llama-server-proxy-header-authorization": "Bearer for-the-target",
            },
        )
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"ok"
        conn.close()
    finally:
        target.shutdown()
        target.server_close()
    assert seen["accept"] == "application/json"
    assert seen["authorization"] == "Bearer for-the-target"
    assert (
        "cookie" not in seen and OPS not in json.dumps(seen) and BACKEND_KEY not in json.dumps(seen)
    )
