"""Start and stop the real processes tests and benchmarks talk to.

Every server binds 127.0.0.1 on a free port, is waited for by polling, and is stopped by
its owner. Nothing here sleeps to synchronise.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, avoid: tuple[int, ...] = ()) -> int:
    """The first of ``count`` consecutive free ports, none of them in ``avoid``.

    Backend i listens on PORT_BACKEND + i: with several, every one of them must be free.
    """
    while True:
        first = free_port()
        if any(first <= port < first + count for port in avoid):
            continue
        probes = [socket.socket() for _ in range(count - 1)]
        try:
            for offset, probe in enumerate(probes, 1):
                probe.bind(("127.0.0.1", first + offset))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()


def llama_server_bin() -> str:
    """The llama-server the tests run: LLAMA_SERVER_BIN, .venv/bin, or PATH."""
    candidates = [
        os.environ.get("LLAMA_SERVER_BIN", ""),
        str(ROOT / ".venv" / "bin" / "llama-server"),
        shutil.which("llama-server") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no llama-server found: run `make setup` (or set LLAMA_SERVER_BIN)")


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def http_get(
    port: int, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def answers(
    port: int, path: str, status: int = 200, headers: Mapping[str, str] | None = None
) -> bool:
    try:
        return http_get(port, path, headers, timeout=2.0)[0] == status
    except OSError:
        return False


@dataclass
class Process:
    """A child process with its captured output in a file."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> "Process":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        else:
            # Children the process may have left behind in its session.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()
        return self.proc.returncode


def start_llama_server(
    model: Path,
    log_path: Path,
    *,
    api_key: str = "",
    parallel: int = 4,
    ctx_per_slot: int = 512,
    extra: list[str] | None = None,
    port: int | None = None,
    wait: bool = True,
) -> tuple[Process, int]:
    port = port or free_port()
    args = [
        llama_server_bin(),
        "-m", str(model),
        "--host", "127.0.0.1",
        "--port", str(port),
        "-np", str(parallel),
        "-c", str(ctx_per_slot * parallel),
        "--threads", "1",
        "--metrics",
        "--slots",
    ]  # fmt: skip
    if api_key:
        args += ["--api-key", api_key]
    args += extra or []
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    proc = Process(args, env, log_path).start()
    if wait:
        try:
            wait_until(
                lambda: answers(port, "/health") or not proc.alive(), 60, "llama-server to load"
            )
        except TimeoutError:
            proc.stop()
            raise
        if not proc.alive():
            raise RuntimeError(f"llama-server exited:\n{proc.log()[-3000:]}")
    return proc, port


def start_llama_router(models: Path, log_path: Path, api_key: str) -> tuple[Process, int]:
    """llama-server in router mode over the models in ``models`` (as start.sh runs it), up."""
    port = free_port()
    args = [
        llama_server_bin(),
        "--models-dir", str(models),
        "--models-max", "2",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--api-key", api_key,
        "-c", "2048",
        "--threads", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    proc = Process(args, env, log_path).start()
    try:
        wait_until(lambda: answers(port, "/health") or not proc.alive(), 60, "the router")
        assert proc.alive(), proc.log()[-3000:]
    except BaseException:
        proc.stop()
        raise
    return proc, port


def start_gateway(
    env: Mapping[str, str],
    log_path: Path,
    *,
    port: int | None = None,
    wait_ready: bool = True,
) -> tuple[Process, int]:
    port = port or free_port()
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    full_env.update(env)
    proc = Process([sys.executable, str(SCRIPTS / "gateway.py")], full_env, log_path).start()
    if wait_ready:
        try:
            wait_until(
                lambda: answers(port, "/ping") or not proc.alive(), 30, "the gateway to be ready"
            )
        except TimeoutError:
            proc.stop()
            raise
        if not proc.alive():
            raise RuntimeError(f"gateway exited:\n{proc.log()[-3000:]}")
    return proc, port
