"""Per-key limits shared by every gateway replica, kept in Redis (REDIS_URL).

Each decision is one server-side Lua script, so a check and its take are atomic across
replicas:

* requests per minute: a sorted set of request times per key, trimmed to 60 s;
* tokens per minute: a sorted set of reservations (by time) and a hash of their sizes,
  summed at each reservation and settled to real usage afterwards;
* concurrency: a sorted set of leases scored by their expiry. A replica renews the leases
  it holds every LEASE_SECONDS / 3; a replica that dies stops renewing, and its leases
  lapse within LEASE_SECONDS.

The client is a few dozen lines of RESP on asyncio streams (the gateway's runtime is the
standard library). No request waits on Redis for more than REDIS_TIMEOUT: a slow or
unreachable Redis makes the replica fall back to its own in-memory limits, report
``limiter`` down in /health and ``gateway_limiter_up 0``, and reconnect in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import time
import urllib.parse
from collections.abc import Sequence

log = logging.getLogger("gateway")

REDIS_TIMEOUT = 0.1  # seconds a request may wait on Redis
RECONNECT_SECONDS = 1.0
PREFIX = "llama-gguf-inference:"

# KEYS[1] times; ARGV now_ms, limit, member. -> {0, count} taken, or {wait_ms, count}.
RATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - 60000)
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {math.max(1, tonumber(oldest[2]) + 60000 - ARGV[1]), count}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], 61000)
return {0, count + 1}
"""

# KEYS[1] reservation times, KEYS[2] reservation sizes; ARGV now_ms, tokens, limit, id.
# -> {0, used} reserved, {wait_ms, used} later, {-1, used} never.
RESERVE = """
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - 60000)
if #old > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - 60000)
  redis.call('HDEL', KEYS[2], unpack(old))
end
local tokens, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local used = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(v) end
if tokens > limit then return {-1, used} end
if used + tokens > limit then
  local excess = used + tokens - limit
  local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    excess = excess - tonumber(redis.call('HGET', KEYS[2], entries[i]) or 0)
    if excess <= 0 then return {math.max(1, tonumber(entries[i + 1]) + 60000 - ARGV[1]), used} end
  end
  return {60000, used}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], tokens)
redis.call('PEXPIRE', KEYS[1], 61000)
redis.call('PEXPIRE', KEYS[2], 61000)
return {0, used + tokens}
"""

# KEYS[1] sizes; ARGV id, tokens. Settles a reservation still in the window.
SETTLE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""

# KEYS[1] leases; ARGV now_ms, limit, lease, expiry_ms. -> 1 taken, 0 full.
ENTER = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4] - ARGV[1] + 1000)
return 1
"""


class RedisError(Exception):
    """Redis answered with an error, or could not be reached in time."""


def _command(args: Sequence[str | int | float]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def _reply(reader: asyncio.StreamReader) -> object:
    line = await reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = await reader.readexactly(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [await _reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected Redis reply {line[:20]!r}")


class RedisClient:
    """One connection, one command at a time (a lock keeps replies in order)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"REDIS_URL={url!r}: expected redis://[:password@]host[:port][/db]")
        self.host = parts.hostname
        self.port = parts.port or 6379
        self.password = urllib.parse.unquote(parts.password or "")
        self.username = urllib.parse.unquote(parts.username or "")
        self.db = int(parts.path.strip("/") or 0)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()
        self._shas: dict[str, str] = {}

    @property
    def connected(self) -> bool:
        return self._streams is not None

    async def connect(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._streams = (reader, writer)
        try:
            if self.password:
                auth = [self.username, self.password] if self.username else [self.password]
                await self._call("AUTH", *auth)
            if self.db:
                await self._call("SELECT", self.db)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].transport.abort()
            self._streams = None

    async def _call(self, *args: str | int | float) -> object:
        assert self._streams is not None
        reader, writer = self._streams
        writer.write(_command(args))
        return await _reply(reader)

    async def call(self, *args: str | int | float) -> object:
        """One command; any failure closes the connection (it is reopened later)."""
        if self._streams is None:
            raise RedisError("not connected")
        try:
            async with self._lock:
                return await self._call(*args)
        except RedisError:
            raise
        except (OSError, asyncio.IncompleteReadError, ValueError, BaseException):
            self.close()  # a reply may still be on its way: the stream is out of step
            raise

    async def script(self, source: str, keys: Sequence[str], args: Sequence[object]) -> object:
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        params: list[str | int | float] = [len(keys), *keys, *[str(a) for a in args]]
        try:
            return await self.call("EVALSHA", sha, *params)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.call("EVAL", source, *params)


class SharedLimits:
    """The shared side of per-key limits; every method returns None when Redis cannot
    answer within REDIS_TIMEOUT, and the caller then decides with its local limits."""

    def __init__(self, url: str, lease_seconds: float) -> None:
        self.client = RedisClient(url)
        self.lease_seconds = lease_seconds
        self.up = False
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}.{os.urandom(4).hex()}."
        self._leases: dict[str, tuple[str, str]] = {}  # lease -> (redis key, key_id)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for lease, (key, _) in list(self._leases.items()):
            await self._run("ZREM", key, lease)
        self.client.close()

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    async def _maintain(self) -> None:
        """Keep a connection (reconnecting after failures) and renew the leases we hold."""
        renewed = 0.0
        while True:
            if not self.client.connected:
                try:
                    async with asyncio.timeout(2.0):
                        await self.client.connect()
                    await asyncio.wait_for(self.client.call("PING"), 2.0)
                    if not self.up:
                        log.info(
                            "limiter: Redis at %s:%s is up", self.client.host, self.client.port
                        )
                    self.up = True
                except (OSError, TimeoutError, RedisError, ConnectionError) as exc:
                    self.client.close()
                    if self.up:
                        log.warning("limiter: Redis unreachable (%s): limits are per replica", exc)
                    self.up = False
            elif time.monotonic() - renewed >= self.lease_seconds / 3:
                renewed = time.monotonic()
                expiry = int(time.time() * 1000 + self.lease_seconds * 1000)
                for lease, (key, _) in list(self._leases.items()):
                    await self._run("ZADD", key, "XX", expiry, lease)
            await asyncio.sleep(RECONNECT_SECONDS if not self.up else 0.5)

    async def _run(self, *args: str | int | float) -> object | None:
        if not self.up:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                return await self.client.call(*args)
        except (OSError, TimeoutError, RedisError, ConnectionError, asyncio.IncompleteReadError):
            self._down()
            return None

    async def _script(self, source: str, keys: list[str], args: list[object]) -> object | None:
        if not self.up:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                return await self.client.script(source, keys, args)
        except (OSError, TimeoutError, RedisError, ConnectionError, asyncio.IncompleteReadError):
            self._down()
            return None

    def _down(self) -> None:
        if self.up:
            log.warning(
                "limiter: Redis did not answer in %.0f ms: limits are per replica now",
                REDIS_TIMEOUT * 1000,
            )
        self.up = False
        self.client.close()

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)

    async def take_request(self, key_id: str, limit: int) -> tuple[float, int] | None:
        """(seconds to wait or 0 when counted, requests in the window) or None."""
        got = await self._script(
            RATE, [PREFIX + "rpm:" + key_id], [self._now_ms(), limit, self._new_id()]
        )
        if not isinstance(got, list):
            return None
        return int(got[0]) / 1000, int(got[1])

    async def reserve(
        self, key_id: str, tokens: int, limit: int
    ) -> tuple[str | None, float, int] | None:
        """(reservation id, 0, used) when reserved, (None, wait s or inf, used), or None."""
        rid = self._new_id()
        keys = [PREFIX + "tpm:" + key_id, PREFIX + "tpmv:" + key_id]
        got = await self._script(RESERVE, keys, [self._now_ms(), tokens, limit, rid])
        if not isinstance(got, list):
            return None
        wait, used = int(got[0]), int(got[1])
        if wait == 0:
            return rid, 0.0, used
        return None, (float("inf") if wait < 0 else wait / 1000), used

    async def settle(self, key_id: str, rid: str, tokens: int) -> None:
        await self._script(SETTLE, [PREFIX + "tpmv:" + key_id], [rid, tokens])

    async def enter(self, key_id: str, limit: int) -> str | bool | None:
        """A lease id when a concurrent place was taken, False when full, None: no answer."""
        lease = self._new_id()
        key = PREFIX + "conc:" + key_id
        now = self._now_ms()
        got = await self._script(
            ENTER, [key], [now, limit, lease, now + int(self.lease_seconds * 1000)]
        )
        if got is None:
            return None
        if got == 1:
            self._leases[lease] = (key, key_id)
            return lease
        return False

    async def leave(self, lease: str) -> None:
        held = self._leases.pop(lease, None)
        if held is not None:
            await self._run("ZREM", held[0], lease)
