"""The image's boot, as the Dockerfile defines it, without a Docker engine.

The test reads the Dockerfile's ENV, ENTRYPOINT and HEALTHCHECK and runs that entrypoint
with those values against a real llama-server and a generated model. Two substitutions,
because the image's paths do not exist here: /opt/llama-gguf-inference/scripts is this
checkout's scripts/, and LLAMA_SERVER_BIN (/app/llama-server in the image) is the
llama-server the tests built. tini is used when installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import openai

from support.procs import ROOT, Process, free_port, http_get, llama_server_bin, wait_until

DOCKERFILE = (ROOT / "Dockerfile").read_text()
IMAGE_SCRIPTS = "/opt/llama-gguf-inference/scripts"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for line in DOCKERFILE.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [
        (item.split(" ", 1)[0].upper(), item.split(" ", 1)[1] if " " in item else "")
        for item in logical
    ]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in instructions():
        if name == "ENV":
            for key, value in re.findall(r'([A-Z_][A-Z0-9_]*)=("[^"]*"|\S*)', args):
                env[key] = value.strip('"')
    return env


def exec_form(instruction: str) -> list[str]:
    for name, args in instructions():
        if name == instruction:
            return list(json.loads(args[args.index("[") :]))
    raise AssertionError(f"no {instruction} in the Dockerfile")


def test_dockerfile_contract() -> None:
    env = image_env()
    names = [name for name, _ in instructions()]
    assert "DATA_DIR" not in env, "a baked DATA_DIR defeats platform detection"
    assert env["LLAMA_ARG_HOST"] == "", "the base image's LLAMA_ARG_HOST=0.0.0.0 must not leak"
    assert (env["PORT"], env["PORT_BACKEND"]) == ("8000", "8090")
    # Unset, PORT_HEALTH follows the platform (RunPod serverless: PORT): never baked in.
    assert "PORT_HEALTH" not in env
    assert exec_form("ENTRYPOINT")[:2] == ["/usr/bin/tini", "--"]
    assert exec_form("ENTRYPOINT")[2] == f"{IMAGE_SCRIPTS}/start.sh"
    assert "EXPOSE" in names and "8000" in dict(instructions())["EXPOSE"]
    assert dict(instructions())["STOPSIGNAL"] == "SIGTERM"
    healthcheck = dict(instructions())["HEALTHCHECK"]
    assert (
        "health_server.py" in healthcheck and "--probe" in healthcheck and "8080" not in healthcheck
    )
    assert re.search(r"ARG LLAMA_CPP_TAG=server-cuda-b\d+", DOCKERFILE)
    # COPY keeps file modes: the entrypoint and the commands users run must be executable.
    for script in ("start.sh", "gateway.py", "health_server.py", "key_mgmt.py", "usage_report.py"):
        assert os.access(ROOT / "scripts" / script, os.X_OK), script


def test_image_entrypoint_boots_serves_and_stops_like_docker(
    tmp_path: Path, model_file: Path
) -> None:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    shutil.copy(model_file, data / "models" / "model.gguf")
    key = "sk-container-test-0000000000"
    (data / "api_keys.txt").write_text(f"ci:{key}\n")

    # What the base image sets, then what our Dockerfile sets on top.
    env = {
        "PATH": os.environ["PATH"],
        "HOME": "/root",
        "LLAMA_ARG_HOST": "0.0.0.0",
        "LLAMA_ARG_PORT": "8080",
    }
    env.update(image_env())
    port, health, backend = free_port(), free_port(), free_port()
    env.update(
        DATA_DIR=str(data),
        PORT=str(port),
        PORT_HEALTH=str(health),
        PORT_BACKEND=str(backend),
        LLAMA_SERVER_BIN=llama_server_bin(),
    )
    entrypoint = [
        arg.replace(IMAGE_SCRIPTS, str(ROOT / "scripts")) for arg in exec_form("ENTRYPOINT")
    ]
    if not shutil.which(entrypoint[0]):
        entrypoint = entrypoint[2:]
    proc = Process(entrypoint, env, tmp_path / "container.log").start()
    try:
        wait_until(
            lambda: http_get(health, "/ping")[0] == 200 if _up(health) else False, 30, "ready"
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert client.models.list().data[0].id == "model"  # the file name, never a path

        # llama-server listens on loopback only, whatever LLAMA_ARG_HOST said.
        assert listen_addresses(backend) == {"127.0.0.1"}

        check = [a.replace(IMAGE_SCRIPTS, str(ROOT / "scripts")) for a in exec_form("HEALTHCHECK")]
        assert subprocess.run(check, env=env, timeout=10).returncode == 0

        started = time.monotonic()
        proc.signal(signal.SIGTERM)  # docker stop
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 10
    finally:
        proc.stop()
    log = proc.log()
    assert "platform:      local" in log and key not in log


def _up(port: int) -> bool:
    try:
        http_get(port, "/ping", timeout=1)
        return True
    except OSError:
        return False


def listen_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                if len(address) == 8:
                    found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
                else:
                    found.add("ipv6:" + address)
    return found
