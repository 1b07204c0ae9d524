"""Per-key limits shared by every gateway replica, kept in Redis (REDIS_URL).

Each decision is one server-side Lua script, so a check and its take are atomic across
replicas:

* requests per minute: a sorted set of request times per key, trimmed to 60 s;
* tokens per minute: a sorted set of reservations (by time) and a hash of their sizes,
  summed at each reservation and settled to real usage afterwards;
* daily and monthly token quotas: one counter per key and UTC period (the period is in the
  counter's name, so a new day starts a new counter), created from the replica's ledger
  figure when Redis has none (a Redis restarted empty), reserved when the request starts
  and settled by the difference when it ends; it expires a day after its period;
* concurrency: a sorted set of leases scored by their expiry. A replica renews the leases
  it holds every LEASE_SECONDS / 3; a replica that dies stops renewing, and its leases
  lapse within LEASE_SECONDS.

The client is a few dozen lines of RESP on asyncio streams (the gateway's runtime is the
standard library). No request waits on Redis for more than REDIS_TIMEOUT: a slow or
unreachable Redis makes the replica fall back to its own in-memory limits, report
``limiter`` down in /health and ``gateway_limiter_up 0``, and reconnect in the background.

Any failure is a fallback, never an error of the request: a timeout, a reset, a reply that
is not RESP or not the shape a script returns (the connection is then closed, since later
replies may be out of step), or anything else a broken or hostile Redis can cause. The
background task that reconnects survives all of these too, and only calls Redis up again
once it answers a PING within REDIS_TIMEOUT, so a Redis that is merely slow keeps the
replica on local limits instead of costing one request in every reconnect 100 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence

from .limits import period_end, period_of

log = logging.getLogger("gateway")

REDIS_TIMEOUT = 0.1  # seconds a request may wait on Redis
RECONNECT_SECONDS = 1.0
PREFIX = "llama-gguf-inference:"
# What a reply may hold: the scripts here return a few integers.
MAX_BULK = 1 << 20
MAX_ITEMS = 1024
MAX_DEPTH = 4
_RESP_INT = re.compile(rb"-?[0-9]{1,19}")

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

# KEYS[i] one counter per quota; ARGV tokens, then per quota: limit, seed, expiry (unix ms).
# -> {0, used...} reserved; {i, used...} quota i refused; {-i, used...} quota i never fits.
QUOTA_RESERVE = """
local tokens = tonumber(ARGV[1])
local used = {}
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[3 * i], 'NX', 'PXAT', ARGV[3 * i + 1])
  used[i] = tonumber(redis.call('GET', KEYS[i]))
end
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 * i - 1])
  if tokens > limit then return {-i, unpack(used)} end
  if used[i] + tokens > limit then return {i, unpack(used)} end
end
for i = 1, #KEYS do used[i] = redis.call('INCRBY', KEYS[i], tokens) end
return {0, unpack(used)}
"""

# KEYS[i] the counters a reservation was taken in; ARGV delta (used - reserved).
QUOTA_SETTLE = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('INCRBY', KEYS[i], ARGV[1]) < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 0
"""

# KEYS rpm times, tpm times, tpm sizes, then quota counters; ARGV now_ms.
# -> {requests this minute, tokens this minute, quota counters...} (GET /v1/key).
USAGE = """
local now = tonumber(ARGV[1])
local since = '(' .. (now - 60000)
local out = {redis.call('ZCOUNT', KEYS[1], since, '+inf'), 0}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], since, '+inf')) do
  out[2] = out[2] + tonumber(redis.call('HGET', KEYS[3], id) or 0)
end
for i = 4, #KEYS do out[#out + 1] = tonumber(redis.call('GET', KEYS[i]) or 0) end
return out
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


class RedisProtocolError(ConnectionError):
    """The reply is not RESP, or not what the command returns: the stream is out of step."""


def _command(args: Sequence[str | int | float]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def _reply(reader: asyncio.StreamReader, depth: int = 0) -> object:
    line = await reader.readline()  # a line over the reader's limit raises ValueError
    if not line.endswith(b"\r\n"):
        raise ConnectionError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode(errors="replace")
    if kind == b"-":
        raise RedisError(rest.decode(errors="replace"))
    if kind == b":":
        return _integer(rest)
    if kind == b"$":
        size = _integer(rest)
        if size < 0:
            return None
        if size > MAX_BULK:
            raise RedisProtocolError(f"a {size}-byte Redis reply")
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise RedisProtocolError("a Redis bulk reply not ended by CRLF")
        return data[:-2]
    if kind == b"*":
        count = _integer(rest)
        if count < 0:
            return None
        if count > MAX_ITEMS or depth >= MAX_DEPTH:
            raise RedisProtocolError("a Redis reply nested too deep or too long")
        return [await _reply(reader, depth + 1) for _ in range(count)]
    raise RedisProtocolError(f"unexpected Redis reply {line[:20]!r}")


def _integer(raw: bytes) -> int:
    if _RESP_INT.fullmatch(raw) is None:
        raise RedisProtocolError(f"not a RESP integer: {raw[:20]!r}")
    return int(raw)


def _ints(reply: object, count: int) -> tuple[int, ...]:
    """A script's reply: one integer (``count`` 1) or a list of ``count`` integers; anything
    else means the stream is not to be trusted."""
    if count == 1 and isinstance(reply, int) and not isinstance(reply, bool):
        return (reply,)
    if count > 1 and isinstance(reply, list) and len(reply) == count:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in reply):
            return tuple(reply)
    raise RedisProtocolError(f"a script answered {str(reply)[:40]!r}")


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
        if self._streams is None:  # closed by a failure while this call waited its turn
            raise ConnectionError("Redis connection closed")
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
        except BaseException:
            # A timeout, a reset, a reply we could not read: one may still be on its way,
            # and the stream is out of step for whoever calls next.
            self.close()
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


class QuotaAnswer:
    """Redis's answer to a quota reservation."""

    __slots__ = ("refused", "never", "used", "counters")

    def __init__(
        self, refused: str | None, never: bool, used: dict[str, int], counters: list[str]
    ) -> None:
        self.refused = refused  # the quota kind that refused, None when reserved
        self.never = never  # the request is larger than that quota's whole limit
        self.used = used  # each quota's count after the call
        self.counters = counters  # the counters reserved in, to settle later


class SharedLimits:
    """The shared side of per-key limits; every method returns None when Redis cannot
    answer within REDIS_TIMEOUT, and the caller then decides with its local limits."""

    def __init__(
        self, url: str, lease_seconds: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = RedisClient(url)
        self.clock = clock  # wall time: quotas follow the UTC calendar
        self.lease_seconds = lease_seconds
        self.up = False
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}.{os.urandom(4).hex()}."
        self._leases: dict[str, tuple[str, str]] = {}  # lease -> (redis key, key_id)
        self._task: asyncio.Task[None] | None = None
        self._said_down = False  # the last state logged was "down"

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
        """Keep a connection (reconnecting after failures) and renew the leases we hold.
        Nothing Redis does can end this task: every failure is logged and retried."""
        renewed = 0.0
        while True:
            try:
                if not self.client.connected:
                    await self._reconnect()
                elif time.monotonic() - renewed >= self.lease_seconds / 3:
                    renewed = time.monotonic()
                    expiry = int(time.time() * 1000 + self.lease_seconds * 1000)
                    for lease, (key, _) in list(self._leases.items()):
                        await self._run("ZADD", key, "XX", expiry, lease)
            except Exception as exc:  # noqa: BLE001 - the limiter must outlive any Redis
                self._down(exc)
            await asyncio.sleep(RECONNECT_SECONDS if not self.up else 0.5)

    async def _reconnect(self) -> None:
        try:
            async with asyncio.timeout(2.0):
                await self.client.connect()
            # Up only if it answers within what a request may wait: a Redis that is slower
            # than that would cost a request REDIS_TIMEOUT at every reconnect.
            async with asyncio.timeout(REDIS_TIMEOUT):
                pong = await self.client.call("PING")
            if pong != "PONG":
                raise RedisProtocolError(f"PING answered {str(pong)[:20]!r}")
        except Exception as exc:  # noqa: BLE001 - a failed reconnect is retried later
            self.client.close()
            if self.up or not self._said_down:
                reason = "timed out" if isinstance(exc, TimeoutError) else exc
                log.warning(
                    "limiter: Redis at %s:%s unusable (%s): limits are per replica",
                    self.client.host,
                    self.client.port,
                    reason,
                )
                self._said_down = True
            self.up = False
            return
        if not self.up:
            log.info("limiter: Redis at %s:%s is up", self.client.host, self.client.port)
        self.up = True
        self._said_down = False

    async def _run(self, *args: str | int | float) -> object | None:
        if not self.up:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                return await self.client.call(*args)
        except Exception as exc:  # noqa: BLE001 - any failure of Redis is a fallback
            self._down(exc)
            return None

    async def _script(
        self, source: str, keys: list[str], args: list[object], count: int
    ) -> tuple[int, ...] | None:
        """The script's reply as ``count`` integers, or None: no answer within
        REDIS_TIMEOUT, or any failure at all (the caller then decides locally)."""
        if not self.up:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                return _ints(await self.client.script(source, keys, args), count)
        except Exception as exc:  # noqa: BLE001 - any failure of Redis is a fallback
            self._down(exc)
            return None

    def _down(self, exc: BaseException) -> None:
        if self.up:
            if isinstance(exc, TimeoutError):
                reason = f"did not answer in {REDIS_TIMEOUT * 1000:.0f} ms"
            else:
                reason = f"failed ({type(exc).__name__}: {str(exc)[:80]})"
            log.warning("limiter: Redis %s: limits are per replica now", reason)
            self._said_down = True
        self.up = False
        self.client.close()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def take_request(self, key_id: str, limit: int) -> tuple[float, int] | None:
        """(seconds to wait or 0 when counted, requests in the window) or None."""
        got = await self._script(
            RATE, [PREFIX + "rpm:" + key_id], [self._now_ms(), limit, self._new_id()], 2
        )
        if got is None:
            return None
        return got[0] / 1000, got[1]

    async def reserve(
        self, key_id: str, tokens: int, limit: int
    ) -> tuple[str | None, float, int] | None:
        """(reservation id, 0, used) when reserved, (None, wait s or inf, used), or None."""
        rid = self._new_id()
        keys = [PREFIX + "tpm:" + key_id, PREFIX + "tpmv:" + key_id]
        got = await self._script(RESERVE, keys, [self._now_ms(), tokens, limit, rid], 2)
        if got is None:
            return None
        wait, used = got
        if wait == 0:
            return rid, 0.0, used
        return None, (float("inf") if wait < 0 else wait / 1000), used

    async def settle(self, key_id: str, rid: str, tokens: int) -> None:
        await self._script(SETTLE, [PREFIX + "tpmv:" + key_id], [rid, tokens], 1)

    @staticmethod
    def quota_key(key_id: str, kind: str, period: str) -> str:
        return f"{PREFIX}quota:{kind}:{period}:{key_id}"

    async def reserve_quota(
        self, key_id: str, tokens: int, quotas: Mapping[str, tuple[int, int]]
    ) -> QuotaAnswer | None:
        """Reserve ``tokens`` in each quota (kind -> (limit, this replica's seed)), or say
        which one refused; None when Redis did not answer."""
        wall = self.clock()
        kinds = list(quotas)
        keys = [self.quota_key(key_id, kind, period_of(kind, wall)) for kind in kinds]
        args: list[object] = [tokens]
        for kind in kinds:
            limit, seed = quotas[kind]
            # Kept a day past the period, so a request that ends after midnight settles.
            expiry = int((period_end(kind, wall) + 86400) * 1000)
            args += [limit, seed, expiry]
        got = await self._script(QUOTA_RESERVE, keys, args, 1 + len(kinds))
        if got is None:
            return None
        status = got[0]
        used = dict(zip(kinds, got[1:]))
        if status == 0:
            return QuotaAnswer(None, False, used, keys)
        return QuotaAnswer(kinds[abs(status) - 1], status < 0, used, [])

    async def settle_quota(self, counters: Sequence[str], delta: int) -> None:
        if counters and delta:
            await self._script(QUOTA_SETTLE, list(counters), [delta], 1)

    async def usage(self, key_id: str, kinds: Sequence[str]) -> list[int] | None:
        """[requests, tokens this minute, then each quota's count] over every replica."""
        wall = self.clock()
        keys = [
            PREFIX + "rpm:" + key_id,
            PREFIX + "tpm:" + key_id,
            PREFIX + "tpmv:" + key_id,
            *(self.quota_key(key_id, kind, period_of(kind, wall)) for kind in kinds),
        ]
        got = await self._script(USAGE, keys, [self._now_ms()], 2 + len(kinds))
        return list(got) if got is not None else None

    async def enter(self, key_id: str, limit: int) -> str | bool | None:
        """A lease id when a concurrent place was taken, False when full, None: no answer."""
        lease = self._new_id()
        key = PREFIX + "conc:" + key_id
        now = self._now_ms()
        got = await self._script(
            ENTER, [key], [now, limit, lease, now + int(self.lease_seconds * 1000)], 1
        )
        if got is None:
            return None
        if got[0] == 1:
            self._leases[lease] = (key, key_id)
            return lease
        return False

    async def leave(self, lease: str) -> None:
        held = self._leases.pop(lease, None)
        if held is not None:
            await self._run("ZREM", held[0], lease)
