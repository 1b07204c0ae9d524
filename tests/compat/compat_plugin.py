"""A pytest plugin loaded into llama.cpp's own server test suite by ``run.py``.

The suite starts llama-server through ``utils.ServerProcess`` and downloads its models
from the Hugging Face Hub. This plugin changes that, at run time and without editing the
suite's files:

* every model the suite would download is the local tiny model ``COMPAT_MODEL`` (a
  server asked for embeddings pools by mean, which a llama model needs);
* ``COMPAT_MODE=gateway``: each llama-server the suite starts listens on a free port with
  the backend key, and the real gateway takes the port the suite talks to. A test that
  gave the server no key of its own has the harness key added to its requests (the suite
  sends none), as a user of the gateway would; a test's own key and the suite's OpenAI
  clients' ``dummy`` key are gateway keys too. The gateway's CORS origins are the
  server's (llama-server's default: ``*``, or ``localhost`` when it runs tools).
* every test is bounded by ``COMPAT_TEST_TIMEOUT`` seconds, so one hang cannot stall the run.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

MODE = os.environ.get("COMPAT_MODE", "direct")
MODEL = os.environ.get("COMPAT_MODEL", "")
GATEWAY = os.environ.get("COMPAT_GATEWAY", "")
WORK = Path(os.environ.get("COMPAT_WORK", "."))
TEST_TIMEOUT = float(os.environ.get("COMPAT_TEST_TIMEOUT", "120"))
BACKEND_KEY = "compat-backend-key-0123456789"
HARNESS_KEY = "sk-compat-harness-key-000000000"
# Keys the suite itself sends: its OpenAI clients' placeholder.
SUITE_KEYS = ("dummy",)

# Gateway ports whose server was given no key by its test: requests there get ours.
_keyless_ports: set[int] = set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _localise(server: Any) -> None:
    """Local models instead of the Hub's (router mode, with no model, stays as it is)."""
    if server.model_hf_repo or server.model_hf_file or server.model_url:
        server.model_hf_repo = None
        server.model_hf_file = None
        server.model_url = None
        server.model_file = MODEL
    if server.server_embeddings and server.pooling is None:
        server.pooling = "mean"


def _keys_file(server: Any) -> Path:
    lines = [f"compat:{HARNESS_KEY} scopes=inference,admin"]
    lines += [f"suite{i}:{key} scopes=inference,admin" for i, key in enumerate(SUITE_KEYS)]
    if server.api_key:
        lines.append(f"test:{server.api_key} scopes=inference,admin")
    path = WORK / f"keys-{os.getpid()}-{server.server_port}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _start_gateway(server: Any, backend_port: int) -> subprocess.Popen[bytes]:
    logs = WORK / "gateway-logs"
    logs.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOST": "127.0.0.1",
        "PORT": str(server.server_port),
        "PORT_HEALTH": str(free_port()),  # two-port mode: the suite's /health is the gateway's
        "PORT_BACKEND": str(backend_port),
        "BACKEND_API_KEY": BACKEND_KEY,
        "AUTH_KEYS_FILE": str(_keys_file(server)),
        "DATA_DIR": str(WORK),
        "LOG_DIR": str(logs),
        "MAX_REQUESTS_PER_MINUTE": "1000000",
        # llama-server's own default: any origin, or this machine's when tools run.
        "CORS_ORIGINS": server.cors_origins or ("localhost" if server.server_tools else "*"),
        # The server's tools or its CORS proxy (the UI's MCP proxy) turned on: allowed here too.
        "ALLOW_SERVER_TOOLS": "true" if server.server_tools or server.ui_mcp_proxy else "false",
        # The suite is one tenant checking llama-server's cache counters (cached_tokens,
        # timings.cache_n, return_progress): a multi-tenant gateway reads them as 0.
        "EXPOSE_PROMPT_CACHE": "true",
        "PYTHONUNBUFFERED": "1",
    }
    if server.gcp_compat:
        # Vertex AI runs the container for predictions: the gateway serves its routes too.
        env["AIP_MODE"] = "PREDICTION"
    log = open(logs / f"gateway-{server.server_port}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, GATEWAY], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    import requests

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}")
        try:
            url = f"http://127.0.0.1:{server.server_port}/ping"
            if requests.get(url, timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError("the gateway did not become ready within 30 s")


def _patch(utils: Any) -> None:
    import requests

    server_class = utils.ServerProcess
    original_start = server_class.start
    original_stop = server_class.stop

    def start(self: Any, timeout_seconds: int = utils.DEFAULT_HTTP_TIMEOUT) -> None:
        _localise(self)
        if MODE != "gateway":
            original_start(self, timeout_seconds)
            return
        public_port, test_key = self.server_port, self.api_key
        self.server_port, self.api_key = free_port(), BACKEND_KEY
        backend_port = self.server_port
        try:
            original_start(self, timeout_seconds)
        finally:
            self.server_port, self.api_key = public_port, test_key
        self.compat_gateway = _start_gateway(self, backend_port)
        if not test_key:
            _keyless_ports.add(public_port)

    def stop(self: Any) -> None:
        gateway = getattr(self, "compat_gateway", None)
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait(5)
            self.compat_gateway = None
            _keyless_ports.discard(self.server_port)
        original_stop(self)

    server_class.start = start
    server_class.stop = stop
    # The suite downloads every preset's model once per session; ours are local.
    utils.ServerPreset.load_all = staticmethod(lambda: None)

    original_request = requests.sessions.Session.request

    def request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if _keyless_ports and urllib.parse.urlsplit(url).port in _keyless_ports:
            headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if v is not None}
            if not any(k.lower() in ("authorization", "x-api-key") for k in headers):
                headers["Authorization"] = f"Bearer {HARNESS_KEY}"
            kwargs["headers"] = headers
        return original_request(self, method, url, *args, **kwargs)

    setattr(requests.sessions.Session, "request", request)


def pytest_configure(config: pytest.Config) -> None:
    # The suite's own module (its directory is on PYTHONPATH): the same module object
    # its conftest and tests import afterwards.
    _patch(importlib.import_module("utils"))


class _TestTimeout(Exception):
    pass


def _expired(signum: int, frame: object) -> None:
    raise _TestTimeout(f"test ran past COMPAT_TEST_TIMEOUT ({TEST_TIMEOUT:.0f} s)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
