"""Shared fixtures: a tiny real model, a real llama-server, and the real gateway."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.make_model import write_model
from support.procs import Process, http_get, start_gateway, start_llama_server
from support.redis_server import RedisServer

BACKEND_KEY = "backend-test-key-0123456789"
ALICE = "sk-alice-test-key-000000000000"
OPS = "sk-ops-admin-key-0000000000000"
HASHED = "sk-hashed-key-00000000000000000"
EXPIRED = "sk-expired-key-0000000000000000"


@dataclass
class Backend:
    proc: Process
    port: int
    key: str
    model: Path

    def busy_slots(self) -> int:
        """Slots llama-server says are processing (its /slots, with the backend key)."""
        status, body = http_get(self.port, "/slots", {"Authorization": f"Bearer {self.key}"})
        assert status == 200, body
        return sum(1 for slot in json.loads(body) if slot["is_processing"])


@dataclass
class GatewayHandle:
    proc: Process
    port: int
    backend: Backend

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    write_model(path)
    return path


@pytest.fixture(scope="session")
def backend(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    log = tmp_path_factory.mktemp("logs") / "llama-server.log"
    proc, port = start_llama_server(
        model_file,
        log,
        api_key=BACKEND_KEY,
        parallel=4,
        # Long enough that a generation outlives the disconnect tests' deadlines.
        ctx_per_slot=16384,
        extra=["--embeddings", "--pooling", "mean"],
    )
    try:
        yield Backend(proc, port, BACKEND_KEY, model_file)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api_keys.txt"
    digest = hashlib.sha256(HASHED.encode()).hexdigest()
    path.write_text(
        "# test keys\n"
        f"alice:{ALICE}\n"
        f"ops:{OPS} scopes=inference,admin\n"
        f"hashed:sha256:{digest}\n"
        f"old:{EXPIRED} expires=2020-01-01T00:00:00Z\n"
    )
    return path


def gateway_env(
    backend_port: int, keys_file: Path, backend_key: str = BACKEND_KEY
) -> dict[str, str]:
    return {
        "PORT_BACKEND": str(backend_port),
        "BACKEND_API_KEY": backend_key,
        "AUTH_KEYS_FILE": str(keys_file),
        "DATA_DIR": str(keys_file.parent),
        "LOG_DIR": str(keys_file.parent / "logs"),
        # The suite sends hundreds of requests with one key; rate tests set their own.
        "MAX_REQUESTS_PER_MINUTE": "1000000",
    }


@pytest.fixture(scope="session")
def gateway(
    backend: Backend, keys_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayHandle]:
    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    proc, port = start_gateway(gateway_env(backend.port, keys_file), log)
    try:
        yield GatewayHandle(proc, port, backend)
    finally:
        proc.stop()


GatewayFactory = Callable[..., GatewayHandle]


@pytest.fixture
def make_gateway(backend: Backend, keys_file: Path, tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start a gateway with extra settings (or in front of another backend port)."""
    started: list[Process] = []

    def factory(
        backend_port: int | None = None, wait_ready: bool = True, **env: str
    ) -> GatewayHandle:
        settings = gateway_env(backend_port or backend.port, keys_file)
        settings.update(env)
        proc, port = start_gateway(
            settings, tmp_path / f"gateway-{len(started)}.log", wait_ready=wait_ready
        )
        started.append(proc)
        return GatewayHandle(proc, port, backend)

    try:
        yield factory
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port, stopped after the test."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
