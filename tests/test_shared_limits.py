"""Per-key limits shared by gateway replicas through a real Redis."""

from __future__ import annotations

import http.client
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory, GatewayHandle
from support.fake_redis import FakeRedis, healthy
from support.procs import wait_until
from support.rawhttp import held_stream
from support.redis_server import RedisServer
from test_keys_and_limits import health
from test_limits_hold import post, tokens_counted


def replicas(
    make_gateway: GatewayFactory, tmp_path: Path, redis: RedisServer, lines: str, **env: str
) -> tuple[GatewayHandle, GatewayHandle]:
    keys = tmp_path / "shared_keys.txt"
    keys.write_text(lines)
    settings = {"AUTH_KEYS_FILE": str(keys), "REDIS_URL": redis.url, **env}
    first, second = make_gateway(**settings), make_gateway(**settings)
    for gw in (first, second):
        wait_until(sharing(gw), 10, "the shared limiter")
    return first, second


def sharing(gw: GatewayHandle) -> Callable[[], bool]:
    return lambda: bool(health(gw)["limiter"]["shared"])


def chat(gw: GatewayHandle, key: str, tokens: int = 1) -> int:
    payload = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "ignore_eos": True,
    }
    return post(gw.port, "/v1/chat/completions", key, payload)[0]


def test_rpm_holds_across_replicas_under_parallel_bursts(
    make_gateway: GatewayFactory, tmp_path: Path, redis: RedisServer
) -> None:
    a, b = replicas(make_gateway, tmp_path, redis, "r:sk-shared-rate-00 rpm=6\n")
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda i: chat(a if i % 2 else b, "sk-shared-rate-00"), range(12)))
    assert sorted(statuses) == [200] * 6 + [429] * 6


def test_tpm_holds_across_replicas(
    make_gateway: GatewayFactory, tmp_path: Path, redis: RedisServer
) -> None:
    a, b = replicas(make_gateway, tmp_path, redis, "t:sk-shared-tokens0 tpm=2000\n")
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(lambda i: chat(a if i % 2 else b, "sk-shared-tokens0", 300), range(8))
        )
    assert 200 in statuses and 429 in statuses
    used = [tokens_counted(gw, "t") for gw in (a, b)]
    assert sum(u["prompt"] + u["completion"] for u in used) <= 2000


def test_a_replica_killed_mid_request_gives_its_concurrency_back(
    make_gateway: GatewayFactory, tmp_path: Path, redis: RedisServer
) -> None:
    a, b = replicas(
        make_gateway,
        tmp_path,
        redis,
        "c:sk-shared-conc-00 concurrency=1\n",
        REDIS_LEASE_SECONDS="2",
    )
    with held_stream(a.port, "sk-shared-conc-00", 10):  # streaming: its lease is held
        assert chat(b, "sk-shared-conc-00") == 429
        a.proc.proc.send_signal(signal.SIGKILL)  # no drain, no release: only the lease's expiry
        started = time.monotonic()
        wait_until(lambda: chat(b, "sk-shared-conc-00") == 200, 15, "the lease to lapse")
        assert time.monotonic() - started < 10


def test_requests_keep_flowing_while_redis_is_down_and_sharing_resumes(
    make_gateway: GatewayFactory, tmp_path: Path, redis: RedisServer
) -> None:
    a, b = replicas(make_gateway, tmp_path, redis, "d:sk-shared-down-00 rpm=1000\n")
    redis.stop()
    started = time.monotonic()
    assert [chat(gw, "sk-shared-down-00") for gw in (a, b, a, b)] == [200] * 4
    assert time.monotonic() - started < 10
    wait_until(lambda: not health(a)["limiter"]["shared"], 10, "the limiter to say it is down")
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
    conn.request("GET", "/metrics")
    assert "gateway_limiter_up 0" in conn.getresponse().read().decode()
    conn.close()
    redis.start()  # the same port: the replicas reconnect by themselves
    for gw in (a, b):
        wait_until(sharing(gw), 15, "the limiter to come back")
    assert chat(a, "sk-shared-down-00") == 200


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"delay": 0.15}, id="slow-150ms"),
        pytest.param({"reply": b":notanint\r\n"}, id="bad-integer"),
        pytest.param({"reply": b"*3\r\n:1\r\n:2\r\n:3\r\n"}, id="wrong-shape"),
        pytest.param({"reply": b"$99999999999\r\n"}, id="huge-bulk"),
        pytest.param({"reset": True}, id="reset"),
    ],
)
def test_every_request_is_answered_whatever_redis_does(
    make_gateway: GatewayFactory, tmp_path: Path, fault: dict[str, Any]
) -> None:
    fake = FakeRedis().start()
    try:
        keys = tmp_path / "fault_keys.txt"
        keys.write_text("f:sk-shared-fault-00 rpm=1000 tpm=100000 concurrency=4\n")
        gw = make_gateway(AUTH_KEYS_FILE=str(keys), REDIS_URL=fake.url)
        wait_until(sharing(gw), 10, "the shared limiter")
        fake.delay = fault.get("delay", 0.0)
        fake.reset = fault.get("reset", False)
        if "reply" in fault:
            raw = fault["reply"]
            fake.reply = lambda c: raw if c[0].upper() in (b"EVALSHA", b"EVAL") else healthy(c)
        with ThreadPoolExecutor(4) as pool:  # the key's concurrency
            statuses = list(pool.map(lambda _: chat(gw, "sk-shared-fault-00"), range(12)))
        assert statuses == [200] * 12  # answered, within the key's local limits
        assert not health(gw)["limiter"]["shared"]
        fake.delay, fake.reset, fake.reply = 0.0, False, healthy
        wait_until(sharing(gw), 15, "the limiter to come back")  # its task survived
        assert chat(gw, "sk-shared-fault-00") == 200
        assert "Traceback" not in gw.proc.log()
    finally:
        fake.stop()
