"""scripts/start.sh: its functions (sourced) and the whole stack it supervises, for real."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from support.make_model import write_model
from support.procs import ROOT, Process, answers, free_port, http_get, llama_server_bin, wait_until

START = ROOT / "scripts" / "start.sh"
KEY = "sk-supervisor-test-key-000000"


def sourced(snippet: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``snippet`` in bash after sourcing start.sh (main does not run)."""
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", "-c", f'source "{START}"; {snippet}'],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


# ------------------------------------------------------------------ sourced functions


@pytest.mark.parametrize(
    "dirs, env, expected",
    [
        pytest.param([], {}, "/data", id="nothing-means-data"),
        pytest.param(["workspace"], {}, "/workspace", id="pod-or-vast-workspace"),
        pytest.param(
            ["runpod-volume", "workspace"],
            {"RUNPOD_POD_ID": "abc"},
            "/runpod-volume",
            id="runpod-serverless",
        ),
        pytest.param(["runpod-volume"], {}, "/data", id="volume-without-runpod-id"),
        pytest.param(["workspace"], {"DATA_DIR": "/explicit"}, "/explicit", id="explicit-wins"),
    ],
)
def test_data_dir_detection(
    tmp_path: Path, dirs: list[str], env: dict[str, str], expected: str
) -> None:
    for name in dirs:
        (tmp_path / name).mkdir()
    result = sourced("resolve_data_dir", {"ROOT_PREFIX": str(tmp_path), **env})
    assert result.returncode == 0, result.stderr
    prefix = "" if expected == "/explicit" else str(tmp_path)
    assert result.stdout.strip() == prefix + expected


def test_platform_detection(tmp_path: Path) -> None:
    (tmp_path / "runpod-volume").mkdir()
    cases = [
        ({"RUNPOD_POD_ID": "x"}, "runpod-serverless"),
        ({"VAST_CONTAINERLABEL": "C.1"}, "vastai"),
        ({}, "local"),
    ]
    for env, expected in cases:
        assert (
            sourced("detect_platform", {"ROOT_PREFIX": str(tmp_path), **env}).stdout.strip()
            == expected
        )
    shutil.rmtree(tmp_path / "runpod-volume")
    assert (
        sourced(
            "detect_platform", {"ROOT_PREFIX": str(tmp_path), "RUNPOD_POD_ID": "x"}
        ).stdout.strip()
        == "runpod-pod"
    )


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


def test_model_resolution(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    show = 'resolve_model "$1"; echo "$MODEL_MODE|$MODEL_FILE"'

    def resolve(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return sourced(f'set -- "{models}"; {show}', env)

    none = resolve()
    assert none.returncode == 2 and str(models) in none.stderr and "MODEL_PATH" in none.stderr

    touch(models / "big-00001-of-00003.gguf")
    touch(models / "big-00002-of-00003.gguf")
    touch(models / "big-00003-of-00003.gguf")
    touch(models / "mmproj-big.gguf")
    assert resolve().stdout.strip() == f"single|{models}/big-00001-of-00003.gguf"

    touch(models / "other.gguf")
    assert resolve().stdout.strip() == "router|"
    assert resolve({"MODEL_NAME": "other.gguf"}).stdout.strip() == f"single|{models}/other.gguf"
    explicit = touch(tmp_path / "elsewhere.gguf")
    assert resolve({"MODEL_PATH": str(explicit)}).stdout.strip() == f"single|{explicit}"

    missing = resolve({"MODEL_NAME": "nope.gguf"})
    assert missing.returncode == 2 and "MODEL_NAME=nope.gguf" in missing.stderr
    missing = resolve({"MODEL_PATH": "/no/such.gguf"})
    assert missing.returncode == 2 and "MODEL_PATH=/no/such.gguf" in missing.stderr


def llama_args(env: dict[str, str]) -> list[str]:
    result = sourced(
        "MODEL_MODE=single MODEL_FILE=/m.gguf; llama_args /models /run/key",
        {"PORT_BACKEND": "9999", **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_llama_flags_are_passed_only_when_set() -> None:
    base = llama_args({})
    assert base == [
        "-m", "/m.gguf", "--host", "127.0.0.1", "--port", "9999",
        "--api-key-file", "/run/key", "--metrics", "--slots",
    ]  # fmt: skip
    full = llama_args(
        {"NGL": "99", "CTX": "8192", "PARALLEL": "8", "EXTRA_ARGS": "--flash-attn on --jinja"}
    )
    assert full[len(base) :] == [
        "-ngl",
        "99",
        "-c",
        "8192",
        "-np",
        "8",
        "--flash-attn",
        "on",
        "--jinja",
    ]


def test_router_mode_passes_the_models_dir() -> None:
    result = sourced("MODEL_MODE=router; llama_args /models /k", {"PORT_BACKEND": "1"})
    assert result.stdout.split()[:2] == ["--models-dir", "/models"]


def test_inherited_llama_env_is_scrubbed() -> None:
    env = {
        "LLAMA_ARG_HOST": "0.0.0.0",
        "LLAMA_ARG_PORT": "80",
        "LLAMA_API_KEY": "leak",
        "LLAMA_ARG_CTX_SIZE": "4096",
    }
    result = sourced("scrub_llama_env; env | grep ^LLAMA_ || true", env)
    assert result.stdout.split() == ["LLAMA_ARG_CTX_SIZE=4096"]


# ------------------------------------------------------------------ the real stack


class Stack:
    def __init__(self, data_dir: Path, log: Path, **env: str) -> None:
        self.port, self.health, self.backend = free_port(), free_port(), free_port()
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "DATA_DIR": str(data_dir),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PORT_HEALTH": str(self.health),
            "PORT_BACKEND": str(self.backend),
            "LLAMA_SERVER_BIN": llama_server_bin(),
            "PYTHONUNBUFFERED": "1",
            "FAILED_HEALTH_GRACE": "2",
        }
        self.env.update(env)
        self.proc = Process(["bash", str(START)], self.env, log)

    def health_status(self) -> int:
        try:
            return http_get(self.health, "/ping", timeout=1)[0]
        except OSError:
            return 0


@pytest.fixture
def data_dir(tmp_path: Path, model_file: Path) -> Path:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    shutil.copy(model_file, data / "models" / "tiny.gguf")
    (data / "api_keys.txt").write_text(f"tester:{KEY}\n")
    return data


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:
        stack.proc.stop(timeout=15)


def start_stack(stacks: list[Stack], data_dir: Path, tmp_path: Path, **env: str) -> Stack:
    stack = Stack(data_dir, tmp_path / f"start-{len(stacks)}.log", **env)
    stack.proc.start()
    stacks.append(stack)
    return stack


def slow_llama_wrapper(tmp_path: Path, delay: float) -> Path:
    """llama-server that takes ``delay`` seconds before it starts (a slow model load)."""
    wrapper = tmp_path / "slow-llama-server"
    wrapper.write_text(f'#!/bin/sh\nsleep {delay}\nexec "{llama_server_bin()}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_health_goes_204_then_200_and_the_sdk_works(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    stack = start_stack(
        stacks, data_dir, tmp_path, LLAMA_SERVER_BIN=str(slow_llama_wrapper(tmp_path, 3.0))
    )
    started = time.monotonic()
    wait_until(lambda: stack.health_status() != 0, 5, "the health responder")
    assert time.monotonic() - started < 2.0
    assert stack.health_status() == 204
    wait_until(lambda: answers(stack.port, "/ping", 503), 10, "the gateway to say it is not ready")
    assert stack.health_status() == 204
    status, body = http_get(stack.port, "/health")
    assert status == 503 and json.loads(body)["status"] in ("starting", "loading")
    wait_until(lambda: stack.health_status() == 200, 30, "health 200")
    assert answers(stack.port, "/ping", 200)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=KEY, max_retries=0)
    result = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )
    assert result.usage is not None and result.usage.completion_tokens == 4
    status, body = http_get(stack.port, "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ready" and health["slots"]["total"] >= 1
    assert health["platform"] == "local"
    log = stack.proc.log()
    assert "---- llama-gguf-inference boot ----" in log and "tiny.gguf" in log
    assert KEY not in log
    assert stack.env.get("BACKEND_API_KEY") is None


def test_sigterm_during_a_stream_drains_it_and_exits_0(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    # A generous drain: the stream must end by itself even on a loaded machine.
    stack = start_stack(stacks, data_dir, tmp_path, DRAIN_TIMEOUT="90", CTX="20000", PARALLEL="1")
    wait_until(lambda: stack.health_status() == 200, 30, "health 200")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = 0
    health_during_drain: list[int] = []
    for chunk in stream:
        chunks += 1
        if chunks == 5:
            stack.proc.signal(signal.SIGTERM)
        elif chunks > 5 and chunks % 100 == 0:
            health_during_drain.append(stack.health_status())
    assert chunks >= 1000  # the stream ran to its end...
    assert stream.response.is_closed
    assert stack.proc.wait(100) == 0  # ...and the stack exited cleanly afterwards
    assert 503 in health_during_drain and 200 not in health_during_drain[-3:]
    assert not subprocess.run(["pgrep", "-f", str(stack.backend)], capture_output=True).stdout


def test_llama_server_dying_takes_the_stack_down(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    stack = start_stack(stacks, data_dir, tmp_path)
    wait_until(lambda: stack.health_status() == 200, 30, "health 200")
    found = subprocess.run(
        ["pgrep", "-f", "--", f"--port {stack.backend}"], capture_output=True, text=True
    )
    pid = int(found.stdout.split()[0])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: stack.health_status() == 503, 5, "health 503 after the backend died")
    assert stack.proc.wait(15) == 128 + signal.SIGKILL
    assert "llama-server exited unexpectedly" in stack.proc.log()


def misconfigured(tmp_path: Path, data_dir: Path, **env: str) -> tuple[int, str]:
    stack = Stack(data_dir, tmp_path / "bad.log", **env)
    result = subprocess.run(
        ["bash", str(START)], env=stack.env, capture_output=True, text=True, timeout=30
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    "env, expected",
    [
        pytest.param({"PARALLEL": "four"}, "PARALLEL='four'", id="bad-integer"),
        pytest.param({"PORT": "99999"}, "PORT=99999", id="port-out-of-range"),
        pytest.param({"MAX_QUEUE_SIZE": "-3"}, "MAX_QUEUE_SIZE", id="gateway-setting"),
        pytest.param({"STREAM_IDLE_TIMEOUT": "soon"}, "STREAM_IDLE_TIMEOUT", id="bad-timeout"),
        pytest.param({"MODEL_NAME": "missing.gguf"}, "MODEL_NAME=missing.gguf", id="missing-model"),
        pytest.param(
            {"LLAMA_SERVER_BIN": "/no/llama-server"}, "LLAMA_SERVER_BIN", id="missing-binary"
        ),
        pytest.param({"AUTH_ENABLED": "maybe"}, "AUTH_ENABLED", id="bad-bool"),
    ],
)
def test_misconfiguration_exits_2_naming_the_setting(
    tmp_path: Path, data_dir: Path, env: dict[str, str], expected: str
) -> None:
    code, stderr = misconfigured(tmp_path, data_dir, **env)
    assert code == 2, stderr
    assert expected in stderr
    assert "Traceback" not in stderr


def test_no_model_exits_2_naming_the_directory(tmp_path: Path, data_dir: Path) -> None:
    for model in (data_dir / "models").iterdir():
        model.unlink()
    code, stderr = misconfigured(tmp_path, data_dir)
    assert code == 2 and str(data_dir / "models") in stderr


def test_auth_on_without_keys_exits_2_saying_how_to_create_one(
    tmp_path: Path, data_dir: Path
) -> None:
    (data_dir / "api_keys.txt").unlink()
    code, stderr = misconfigured(tmp_path, data_dir)
    assert code == 2 and "key_mgmt.py generate" in stderr


def test_unreadable_key_file_exits_2(tmp_path: Path, data_dir: Path) -> None:
    directory = tmp_path / "keys-dir"
    directory.mkdir()
    code, stderr = misconfigured(tmp_path, data_dir, AUTH_KEYS_FILE=str(directory))
    assert code == 2 and f"AUTH_KEYS_FILE={directory}" in stderr


def test_port_clash_exits_2_naming_the_port(tmp_path: Path, data_dir: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        code, stderr = misconfigured(tmp_path, data_dir, PORT_BACKEND=str(port))
    assert code == 2 and f"PORT_BACKEND={port} is already in use" in stderr


def test_router_mode_serves_every_model(tmp_path: Path, stacks: list[Stack]) -> None:
    data = tmp_path / "router"
    write_model(data / "models" / "alpha.gguf", seed=1)
    write_model(data / "models" / "beta.gguf", seed=2)
    (data / "api_keys.txt").write_text(f"tester:{KEY}\n")
    stack = start_stack(stacks, data, tmp_path)
    wait_until(lambda: stack.health_status() == 200, 30, "health 200")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=KEY, max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta"]
    for name in ("alpha", "beta"):
        result = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert result.model == name
    assert "router mode" in stack.proc.log()


def test_sighup_reloads_keys_through_the_supervisor(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    stack = start_stack(stacks, data_dir, tmp_path)
    wait_until(lambda: stack.health_status() == 200, 30, "health 200")
    stack.proc.signal(signal.SIGHUP)  # docker kill -s HUP
    wait_until(lambda: "keys reloaded" in stack.proc.log(), 5, "the gateway to reload its keys")
    assert stack.proc.alive() and stack.health_status() == 200
