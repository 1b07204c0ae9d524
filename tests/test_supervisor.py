"""scripts/start.sh and the whole stack it supervises, for real (its functions: unit/)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.fake_hub import FakeHub, HubRepo
from support.make_model import write_model
from support.procs import (
    ROOT,
    Process,
    answers,
    free_port,
    free_ports,
    http_get,
    llama_server_bin,
    wait_until,
)

START = ROOT / "scripts" / "start.sh"
KEY = "sk-supervisor-test-key-000000"


# ------------------------------------------------------------------ the real stack


class Stack:
    def __init__(self, data_dir: Path, log: Path, **env: str) -> None:
        self.port, self.health = free_port(), free_port()
        backends = env.get("BACKENDS", "1")
        count = int(backends) if backends.isdigit() else 1
        self.backend = free_ports(count, avoid=(self.port, self.health))
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
    # The model id is the file name, never a path: in /v1/models, responses and /health.
    assert result.model == "tiny" and [m.id for m in client.models.list().data] == ["tiny"]
    status, body = http_get(stack.port, "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ready" and health["slots"]["total"] >= 1
    assert health["models"] == ["tiny"] and "/" not in body.decode()
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
        pytest.param({"BACKENDS": "lots"}, "BACKENDS='lots'", id="bad-backends"),
        pytest.param({"MODELS_MAX": "-1"}, "MODELS_MAX", id="bad-models-max"),
        pytest.param({"REDIS_URL": "redis://:pw@host:nope"}, "REDIS_URL", id="bad-redis-url"),
        pytest.param(
            {"EXTRA_ARGS": "--jinja --context-shift"},
            "EXTRA_ARGS may not set --context-shift: context shift lets one generation run past",
            id="context-shift",
        ),
        pytest.param(
            {"LLAMA_ARG_CONTEXT_SHIFT": "true"}, "LLAMA_ARG_CONTEXT_SHIFT is set", id="ctx-env"
        ),
        pytest.param({"EXTRA_ARGS": "-hfd o/d"}, "EXTRA_ARGS may not set -hfd", id="draft-hub"),
        pytest.param(
            {"EXTRA_ARGS": "--api_prefix /v2"}, "EXTRA_ARGS may not set --api_prefix", id="prefix"
        ),
        pytest.param({"LLAMA_ARG_HF_REPO": "o/r"}, "LLAMA_ARG_HF_REPO is set", id="hf-env"),
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
    # A multi-file model lives in its own subdirectory, as llama-server's router expects.
    write_model(data / "models" / "gamma" / "gamma-Q8_0.gguf", seed=3)
    (data / "api_keys.txt").write_text(f"tester:{KEY}\n")
    stack = start_stack(stacks, data, tmp_path, MODELS_MAX="1")
    wait_until(lambda: stack.health_status() == 200, 30, "health 200")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=KEY, max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta", "gamma"]
    for name in ("alpha", "beta", "gamma"):
        result = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert result.model == name
    log = stack.proc.log()
    assert "router mode" in log and "(3 models)" in log


def test_sighup_reloads_keys_through_the_supervisor(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    stack = start_stack(stacks, data_dir, tmp_path)
    wait_until(lambda: stack.health_status() == 200, 30, "health 200")
    stack.proc.signal(signal.SIGHUP)  # docker kill -s HUP
    wait_until(lambda: "keys reloaded" in stack.proc.log(), 5, "the gateway to reload its keys")
    assert stack.proc.alive() and stack.health_status() == 200


def children_of(pid: int) -> list[str]:
    """Live processes still in ``pid``'s session (the supervisor runs in its own).

    Exited children not yet reaped (<defunct>) are not running; in the image tini reaps them.
    """
    found = subprocess.run(["pgrep", "-s", str(pid), "-a"], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "<defunct>" not in line]


def test_single_port_mode_answers_the_probe_contract_itself(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    """RunPod's defaults: PORT_HEALTH=PORT and a HEALTH_CHECK_PATH of the user's choice."""
    wrapper = slow_llama_wrapper(tmp_path, 3.0)
    stack = Stack(data_dir, tmp_path / "single.log", LLAMA_SERVER_BIN=str(wrapper))
    stack.health = stack.port
    # A serverless worker with no PORT_HEALTH set: RunPod probes PORT.
    del stack.env["PORT_HEALTH"]
    stack.env.update(RUNPOD_ENDPOINT_ID="ep-test", HEALTH_CHECK_PATH="/health")
    stack.proc.start()
    stacks.append(stack)
    started = time.monotonic()
    wait_until(lambda: stack.health_status() != 0, 5, "the gateway's probe")
    assert time.monotonic() - started < 2.0
    assert stack.health_status() == 204
    assert http_get(stack.port, "/health")[0] == 204  # the custom path, while loading
    wait_until(lambda: stack.health_status() == 200, 30, "probe 200")
    assert http_get(stack.port, "/health")[0] == 200
    # Behind RunPod, its own key rides in Authorization; ours in X-API-Key.
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.port}/v1",
        api_key="rp-platform-key-not-ours",
        default_headers={"X-API-Key": KEY},
        max_retries=0,
    )
    models = client.models.list()
    assert [m.id for m in models.data]
    stack.proc.signal(signal.SIGTERM)
    assert stack.proc.wait(20) == 0
    assert not children_of(stack.proc.pid)
    log = stack.proc.log()
    assert "platform:      runpod-serverless" in log and "Traceback" not in log


def test_probes_are_answered_while_strangers_hold_hundreds_of_connections(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    stack = start_stack(stacks, data_dir, tmp_path)
    wait_until(lambda: stack.health_status() == 200, 30, "health 200")
    idle = [socket.create_connection(("127.0.0.1", stack.health)) for _ in range(300)]
    try:
        for sock in idle[:150]:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half-sent
        for _ in range(5):
            started = time.monotonic()
            assert stack.health_status() == 200
            assert time.monotonic() - started < 1.0
        # Idle connections are dropped after a short timeout.
        idle[0].settimeout(10)
        assert idle[0].recv(100) == b""
    finally:
        for sock in idle:
            sock.close()


def test_nothing_outlives_the_supervisor_on_any_way_out(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    stack = start_stack(stacks, data_dir, tmp_path)
    wait_until(lambda: stack.health_status() == 200, 30, "health 200")
    stack.proc.signal(signal.SIGTERM)
    assert stack.proc.wait(20) == 0
    assert not children_of(stack.proc.pid)
    bad = Stack(data_dir, tmp_path / "bad.log", EXTRA_ARGS="--host 0.0.0.0")
    bad.proc.start()
    assert bad.proc.wait(30) == 2 and "EXTRA_ARGS may not set --host" in bad.proc.log()
    assert not children_of(bad.proc.pid)


def processes_mentioning(secret: str) -> list[str]:
    """Command lines (any process) and environments (of llama-server) holding ``secret``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes() if b"llama-server" in cmdline else b""
        except OSError:
            continue
        if secret.encode() in cmdline + environ:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_a_model_from_the_hub_is_fetched_once_then_served_offline(
    tmp_path: Path, model_file: Path, stacks: list[Stack]
) -> None:
    token = "hf_supervisor_test_token_0123"
    hub = FakeHub(
        {"owner/tiny-GGUF": HubRepo({"tiny-Q8_0.gguf": model_file.read_bytes()}, gated=True)},
        token=token,
        pace=0.3,  # a download slow enough to watch
        first_byte_delay=1.0,
    ).start()
    data = tmp_path / "hubdata"
    data.mkdir()
    (data / "api_keys.txt").write_text(f"tester:{KEY}\n")
    env = {"MODEL_REPO": "owner/tiny-GGUF:Q8_0", "HF_ENDPOINT": hub.url, "HF_TOKEN": token}
    # Small parts, so the tiny model takes the parallel path a large one takes.
    parallel = {"GATEWAY_DOWNLOAD_PART_BYTES": "32768", "DOWNLOAD_CONNECTIONS": "4"}
    try:
        stack = start_stack(stacks, data, tmp_path, **env, **parallel)
        wait_until(lambda: health_of(stack).get("status") == "downloading", 20, "downloading")
        # The health responder is its own process: on a loaded machine it may bind a moment
        # after the gateway already says downloading.
        wait_until(lambda: stack.health_status() == 204, 20, "health 204 while downloading")
        health = health_of(stack)
        assert "percent" in health["download"] and "connections" in health["download"]
        assert health["startup"]["phase"] == "downloading"
        assert not processes_mentioning(token)
        wait_until(lambda: stack.health_status() == 200, 60, "health 200")
        size = model_file.stat().st_size
        assert hub.max_active > 1 and sum(t.sent for t in hub.transfers) >= size
        assert all(h.get("Range") for _, p, h in hub.requests if "/resolve/" in p)
        timeline = health_of(stack)["startup"]
        assert timeline["phase"] == "ready"
        assert timeline["download_seconds"] >= 1.0  # the stand-in waits 1 s before each part
        assert timeline["load_seconds"] is not None
        assert timeline["ready_seconds"] >= timeline["download_seconds"] + timeline["load_seconds"]
        _, metrics = http_get(stack.port, "/metrics", timeout=5)
        for phase in ("download", "load", "ready"):
            assert f'gateway_startup_seconds{{phase="{phase}"}}' in metrics.decode()
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=KEY, max_retries=0
        )
        assert [m.id for m in client.models.list().data] == ["tiny-Q8_0"]
        assert not processes_mentioning(token)
        stack.proc.signal(signal.SIGTERM)
        assert stack.proc.wait(20) == 0
        log = stack.proc.log()
        assert token not in log and "MB/s" in log and "connection(s)" in log
        assert "startup: download" in log and "model fetched in" in log
    finally:
        hub.stop()
    # The Hub is gone now: the next start serves from the volume.
    again = start_stack(stacks, data, tmp_path, **env)
    wait_until(lambda: again.health_status() == 200, 60, "health 200 offline")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{again.port}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-Q8_0"]


def test_a_hub_model_that_cannot_be_had_exits_2_leaving_nothing(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    hub = FakeHub({"owner/tiny-GGUF": HubRepo({"tiny-Q8_0.gguf": b"GGUF"}, gated=True)}).start()
    data = tmp_path / "hubfail"
    data.mkdir()
    (data / "api_keys.txt").write_text(f"tester:{KEY}\n")
    try:
        stack = start_stack(
            stacks, data, tmp_path, MODEL_REPO="owner/tiny-GGUF", HF_ENDPOINT=hub.url
        )
        assert stack.proc.wait(30) == 2
    finally:
        hub.stop()
    assert "HF_TOKEN" in stack.proc.log()
    assert not children_of(stack.proc.pid)


def test_a_hub_listing_a_name_with_newlines_exits_2_and_never_reaches_llama_server(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    evil = "tiny-Q8_0.gguf\n--tools\nall\n--api-prefix\n/x.gguf"
    hub = FakeHub({"owner/tiny-GGUF": HubRepo({evil: b"GGUF"})}).start()
    data = tmp_path / "hubevil"
    data.mkdir()
    (data / "api_keys.txt").write_text(f"tester:{KEY}\n")
    try:
        stack = start_stack(
            stacks, data, tmp_path, MODEL_REPO="owner/tiny-GGUF:Q8_0", HF_ENDPOINT=hub.url
        )
        assert stack.proc.wait(30) == 2
    finally:
        hub.stop()
    log = stack.proc.log()
    assert "HF_ENDPOINT=" in log and "refused, nothing was written" in log
    assert "starting 1 llama-server" not in log and "Traceback" not in log
    assert not [p for p in data.rglob("*") if p.is_file() and p.name != "api_keys.txt"]
    assert not children_of(stack.proc.pid)


def health_of(stack: Stack) -> dict[str, Any]:
    try:
        status, body = http_get(stack.port, "/health", timeout=2)
    except OSError:
        return {}
    result: dict[str, Any] = json.loads(body) if body else {}
    return result


def routed(stack: Stack) -> list[int]:
    """Requests the gateway has routed to each backend so far."""
    status, body = http_get(stack.port, "/metrics?format=json")
    counts = json.loads(body)["backend_requests_total"]
    return [counts.get(str(i), 0) for i in range(len(counts))]


def busy_backends(stack: Stack) -> int:
    return sum(1 for b in health_of(stack)["backends"] if b["in_use"])


LONG_SYSTEM = "You answer questions about the sea, briefly and kindly. " * 20


def ask(
    stack: Stack,
    user: str,
    tokens: int = 4,
    system: str = LONG_SYSTEM,
    client: openai.OpenAI | None = None,
) -> int:
    if client is None:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=KEY, max_retries=0
        )
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=tokens,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None
    return reply.usage.completion_tokens


def test_two_backends_share_the_load_and_keep_long_prefixes_together(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    stack = start_stack(stacks, data_dir, tmp_path, BACKENDS="2", PARALLEL="1", CTX="4096")
    wait_until(lambda: stack.health_status() == 200, 60, "health 200")
    health = health_of(stack)
    assert [b["state"] for b in health["backends"]] == ["ready", "ready"]
    assert health["slots"]["total"] == 2
    # A shared long prefix goes where it went before (llama-server's prompt cache).
    before = routed(stack)
    for question in ("tides?", "waves?", "salt?"):
        ask(stack, question)
    after = routed(stack)
    assert sorted(a - b for a, b in zip(after, before)) == [0, 3]
    # While the warm backend is busy with one of them, the next goes to the other one.
    # The long one runs about a second here (the model's whole context); the next is sent
    # as soon as the first is seen busy, on a client made beforehand, so that it is
    # routed well within that second even on a loaded machine.
    ready = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=KEY, max_retries=0)
    with ThreadPoolExecutor(1) as pool:
        long_one = pool.submit(ask, stack, "deep?", 2600)
        wait_until(lambda: busy_backends(stack) == 1, 30, "the first to hold its slot", 0.01)
        ask(stack, "far?", client=ready)
        assert long_one.result() == 2600
    final = routed(stack)
    assert [f - a for f, a in zip(final, after)] == [1, 1]

    # Each llama-server's own series are in the gateway's /metrics, told apart by a label.
    def backend_labels() -> set[str]:
        text = http_get(stack.port, "/metrics")[1].decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        tokens = families.get("llamacpp:tokens_predicted")
        return {s.labels["backend"] for s in tokens.samples} if tokens else set()

    wait_until(lambda: backend_labels() == {"0", "1"}, 30, "both llama-servers' series")
    log = stack.proc.log()
    assert "backends:      2 llama-servers" in log
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"{threads} CPU thread(s) each" in log  # not a thread per core each


def test_one_of_two_backends_dying_ends_the_container_and_drain_waits_for_both(
    data_dir: Path, tmp_path: Path, stacks: list[Stack]
) -> None:
    stack = start_stack(
        stacks, data_dir, tmp_path, BACKENDS="2", PARALLEL="1", CTX="8192", DRAIN_TIMEOUT="60"
    )
    wait_until(lambda: stack.health_status() == 200, 60, "health 200")
    # Drain: a stream on each backend, SIGTERM while both run; both end with [DONE].
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=KEY, max_retries=0)

    def stream(user: str) -> str | None:
        """How the stream ended: "length" when all its tokens came."""
        chunks = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": user}],
            max_tokens=1500,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = None
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(stream, "one"), pool.submit(stream, "two")]
        wait_until(lambda: sum(b["in_use"] for b in health_of(stack)["backends"]) == 2, 30, "two")
        stack.proc.signal(signal.SIGTERM)
        assert [r.result() for r in runs] == ["length", "length"]
    assert stack.proc.wait(60) == 0
    # One backend killed: the container goes with it.
    again = start_stack(stacks, data_dir, tmp_path, BACKENDS="2", PARALLEL="1")
    wait_until(lambda: again.health_status() == 200, 60, "health 200")
    found = subprocess.run(
        ["pgrep", "-f", "--", f"--port {again.backend + 1}"], capture_output=True, text=True
    )
    os.kill(int(found.stdout.split()[0]), signal.SIGKILL)
    assert again.proc.wait(20) == 128 + signal.SIGKILL
    assert "llama-server 1 (port" in again.proc.log()
    assert not children_of(again.proc.pid)
