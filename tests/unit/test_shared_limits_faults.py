"""The shared limiter against a Redis that is slow, garbled or resets: every call falls back
(None) and never raises, and the background task that reconnects never dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from gguf_gateway import shared_limits
from gguf_gateway.shared_limits import SharedLimits
from support.fake_redis import FakeRedis, healthy


@pytest.fixture
def fake() -> Iterator[FakeRedis]:
    server = FakeRedis().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def quick_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_limits, "RECONNECT_SECONDS", 0.05)


async def until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def every_call(limits: SharedLimits) -> list[object]:
    """One of each decision a request asks Redis for, concurrently."""
    return list(
        await asyncio.gather(
            limits.take_request("k", 10),
            limits.reserve("k", 100, 1000),
            limits.enter("k", 2),
            limits.settle("k", "r1", 5),
            limits.take_request("k2", 10),
            limits.enter("k2", 1),
        )
    )


def script_reply(raw: bytes) -> Callable[[list[bytes]], bytes]:
    """Healthy, except that every script is answered with ``raw``."""

    def reply(command: list[bytes]) -> bytes:
        return raw if command[0].upper() in (b"EVALSHA", b"EVAL") else healthy(command)

    return reply


def test_a_healthy_redis_is_used(fake: FakeRedis) -> None:
    def reply(command: list[bytes]) -> bytes:
        # ENTER's script returns one integer (1: taken); the others a pair.
        if command[0].upper() == b"EVALSHA" and command[3].startswith(
            b"llama-gguf-inference:conc:"
        ):
            return b":1\r\n"
        return healthy(command)

    async def run() -> None:
        limits = SharedLimits(fake.url, 5.0)
        limits.start()
        await until(lambda: limits.up, 10, "the limiter to connect")
        assert await limits.take_request("k", 10) == (0.0, 1)
        assert isinstance(await limits.enter("k", 2), str)
        assert limits.up
        await limits.stop()

    fake.reply = reply
    asyncio.run(run())


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b":notanint\r\n", id="bad-integer"),
        pytest.param(b"*2\r\n:1\r\n", id="half-an-array"),
        pytest.param(b"*3\r\n:1\r\n:2\r\n:3\r\n", id="wrong-arity"),
        pytest.param(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n", id="strings-not-integers"),
        pytest.param(b"+OK\r\n", id="wrong-type"),
        pytest.param(b"$999999999999\r\n", id="huge-bulk"),
        pytest.param(b"$3\r\nabcXY", id="bulk-without-crlf"),
        pytest.param(b"*99999\r\n", id="huge-array"),
        pytest.param(b"*1\r\n" * 10 + b":1\r\n", id="nested-deep"),
        pytest.param(b"x" * 200_000 + b"\r\n", id="line-past-the-reader-limit"),
        pytest.param(b"\xff\xfe\x00garbage\r\n", id="not-resp"),
        pytest.param(b"-ERR boom\r\n", id="redis-error"),
        pytest.param(b"", id="no-reply"),
    ],
)
def test_a_bad_reply_falls_back_and_the_limiter_recovers(fake: FakeRedis, raw: bytes) -> None:
    async def run() -> None:
        limits = SharedLimits(fake.url, 5.0)
        limits.start()
        await until(lambda: limits.up, 10, "the limiter to connect")
        fake.reply = script_reply(raw)
        results = await every_call(limits)  # raises nothing
        assert results == [None] * len(results)
        assert not limits.up
        assert limits._task is not None and not limits._task.done()
        fake.reply = healthy
        await until(lambda: limits.up, 10, "the limiter to come back")
        assert await limits.take_request("k", 10) == (0.0, 1)
        await limits.stop()

    asyncio.run(run())


def test_a_slow_redis_falls_back_within_its_budget_and_stays_down(fake: FakeRedis) -> None:
    async def run() -> None:
        limits = SharedLimits(fake.url, 5.0)
        limits.start()
        await until(lambda: limits.up, 10, "the limiter to connect")
        fake.delay = 0.15  # slower than a request may wait
        started = time.monotonic()
        results = await asyncio.gather(*(limits.take_request(f"k{i}", 10) for i in range(20)))
        elapsed = time.monotonic() - started
        assert results == [None] * 20 and not limits.up
        # Generous (a busy CPU), but far below 20 queued round trips of 150 ms.
        assert elapsed < 2.0, elapsed
        # A Redis slower than the budget is not called up again by the reconnects.
        await asyncio.sleep(0.5)
        assert not limits.up and await limits.take_request("k", 10) is None
        assert limits._task is not None and not limits._task.done()
        fake.delay = 0.0
        await until(lambda: limits.up, 10, "the limiter to come back")
        await limits.stop()

    asyncio.run(run())


def test_a_reset_falls_back_and_the_limiter_recovers(fake: FakeRedis) -> None:
    async def run() -> None:
        limits = SharedLimits(fake.url, 5.0)
        limits.start()
        await until(lambda: limits.up, 10, "the limiter to connect")
        fake.reset = True
        assert await every_call(limits) == [None] * 6
        await asyncio.sleep(0.3)  # reconnects meet resets too
        assert limits._task is not None and not limits._task.done()
        fake.reset = False
        await until(lambda: limits.up, 10, "the limiter to come back")
        await limits.stop()

    asyncio.run(run())


@pytest.mark.parametrize(
    "ping",
    [b":x\r\n", b"*1\r\n" * 10, b"$5\r\nPONG", b"-NOAUTH\r\n", b"+NOTPONG\r\n"],
)
def test_garbage_during_reconnect_never_ends_the_background_task(
    fake: FakeRedis, ping: bytes
) -> None:
    async def run() -> None:
        fake.reply = lambda c: ping if c[0].upper() == b"PING" else healthy(c)
        limits = SharedLimits(fake.url, 5.0)
        limits.start()
        await until(lambda: len(fake.commands) >= 3, 10, "a few reconnects")
        assert not limits.up and limits._task is not None and not limits._task.done()
        fake.reply = healthy
        await until(lambda: limits.up, 10, "the limiter to come up")
        await limits.stop()

    asyncio.run(run())
