"""Per-key request and token limits, and slot-aware admission with a fair queue.

Requests per minute use a sliding 60 s window of timestamps, so memory per key is bounded
by its limit. Tokens per minute are reserved before the request goes out (an upper bound of what
llama-server can do for that body, see tokens.py) and settled to the ``usage``
llama-server reports, so a burst of parallel requests cannot overshoot the limit while
each is still running.

Daily and monthly token quotas (UTC calendar day and month) are reserved and settled the
same way, against a counter per period that starts again at zero when the period turns.
They run on the wall clock (a period is a date), passed in by the caller, so a test can
move time across midnight. At start the counters are seeded from the usage ledger.

Admission caps requests in flight at llama-server's slot count: more would only queue
inside llama-server, where a waiting request holds a connection but shows nowhere. A
request counts for every task it makes llama-server run. Waiters are served round-robin
across keys, weighted by each key's priority (a key of priority 3 gets three grants per
turn where a key of priority 1 gets one), and one key holds at most MAX_QUEUE_PER_KEY
places, so a tenant flooding the queue delays the others by at most one turn each and
never fills it for them. A priority only orders the queue: it lifts none of a key's limits.
"""

from __future__ import annotations

import asyncio
import calendar
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

WINDOW = 60.0
DAY, MONTH = "day", "month"


@dataclass(slots=True)
class Reservation:
    at: float
    tokens: int


class RequestWindow:
    """Timestamps of admitted requests in the last WINDOW seconds."""

    __slots__ = ("limit", "_times")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        times = self._times
        while times and times[0] <= now - WINDOW:
            times.popleft()

    def try_take(self, now: float) -> float:
        """0 if admitted (and counted), else seconds until a request would be."""
        self._expire(now)
        if len(self._times) >= self.limit:
            return self._times[0] + WINDOW - now
        self._times.append(now)
        return 0.0

    def remaining(self, now: float) -> int:
        self._expire(now)
        return max(0, self.limit - len(self._times))

    def reset_in(self, now: float) -> float:
        self._expire(now)
        return self._times[0] + WINDOW - now if self._times else 0.0


class TokenWindow:
    """Token reservations in the last WINDOW seconds, settled to real usage."""

    __slots__ = ("limit", "_entries")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: deque[Reservation] = deque()

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries and entries[0].at <= now - WINDOW:
            entries.popleft()

    def used(self, now: float) -> int:
        self._expire(now)
        return sum(e.tokens for e in self._entries)

    def try_reserve(self, tokens: int, now: float) -> Reservation | float:
        """A reservation, or seconds until ``tokens`` would fit (inf: never)."""
        if tokens > self.limit:
            return math.inf
        used = self.used(now)
        if used + tokens <= self.limit:
            reservation = Reservation(now, tokens)
            self._entries.append(reservation)
            return reservation
        # Wait until enough of the oldest reservations expire.
        excess = used + tokens - self.limit
        for entry in self._entries:
            excess -= entry.tokens
            if excess <= 0:
                return entry.at + WINDOW - now
        return WINDOW

    def remaining(self, now: float) -> int:
        return max(0, self.limit - self.used(now))

    def reset_in(self, now: float) -> float:
        self._expire(now)
        return self._entries[0].at + WINDOW - now if self._entries else 0.0


def duration(seconds: float) -> str:
    """OpenAI's reset-header style: "1s", "6m0s", "250ms"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def period_of(kind: str, wall: float) -> str:
    """The UTC calendar period ``wall`` (epoch seconds) falls in: "2026-12-02" or "2026-12"."""
    t = time.gmtime(wall)
    if kind == DAY:
        return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def period_end(kind: str, wall: float) -> float:
    """Epoch seconds at which the period holding ``wall`` ends (the next one starts)."""
    t = time.gmtime(wall)
    if kind == DAY:
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400.0
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def period_start(kind: str, wall: float) -> float:
    """Epoch seconds at which the period holding ``wall`` began."""
    t = time.gmtime(wall)
    return float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday if kind == DAY else 1, 0, 0, 0)))


def stamp(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


class CalendarQuota:
    """Tokens used in the current UTC day or month, reservations included.

    ``shared`` is the count over every replica last read from Redis in this period (None
    without Redis): what headers and refusals show when it is known.
    """

    __slots__ = ("kind", "limit", "period", "used", "shared", "_start", "_end")

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.period = ""
        self.used = 0
        self.shared: int | None = None
        # The current period's bounds (epoch seconds), so most calls need no calendar.
        self._start = self._end = 0.0

    def roll(self, wall: float) -> str:
        if self._start <= wall < self._end:
            return self.period
        period = period_of(self.kind, wall)
        self._end = period_end(self.kind, wall)
        self._start = period_start(self.kind, wall)
        if period != self.period:
            self.period, self.used, self.shared = period, 0, None
        return period

    def seed(self, period: str, used: int) -> None:
        """Usage found in the ledger for ``period`` (at start)."""
        if period == self.period:
            self.used = max(self.used, used)

    def spent(self, wall: float) -> int:
        self.roll(wall)
        return self.used if self.shared is None else max(self.shared, 0)

    def remaining(self, wall: float) -> int:
        return max(0, self.limit - self.spent(wall))

    def reset_in(self, wall: float) -> float:
        self.roll(wall)
        return self._end - wall

    def fits(self, tokens: int, wall: float) -> float:
        """0 when ``tokens`` fit now; else seconds to the period's end (inf: never)."""
        if tokens > self.limit:
            return math.inf
        self.roll(wall)
        return 0.0 if self.used + tokens <= self.limit else self.reset_in(wall)


@dataclass(slots=True)
class QuotaHold:
    """One request's reservation against its key's day and month quotas."""

    tokens: int
    periods: dict[str, str]  # kind -> the period the tokens were reserved in


class KeyLimits:
    """Everything tracked for one key id."""

    __slots__ = ("requests", "tokens", "concurrency", "active", "quotas")

    def __init__(
        self,
        rpm: int,
        tpm: int | None,
        concurrency: int | None,
        daily: int | None = None,
        monthly: int | None = None,
    ) -> None:
        self.requests = RequestWindow(rpm)
        self.tokens = TokenWindow(tpm) if tpm else None
        self.concurrency = concurrency
        self.active = 0
        self.quotas: dict[str, CalendarQuota] = {}
        self._set_quotas(daily, monthly)

    def _set_quotas(self, daily: int | None, monthly: int | None) -> None:
        for kind, limit in ((DAY, daily), (MONTH, monthly)):
            if limit is None:
                self.quotas.pop(kind, None)
            elif kind in self.quotas:
                self.quotas[kind].limit = limit
            else:
                self.quotas[kind] = CalendarQuota(kind, limit)

    def enter(self) -> bool:
        """Take one of the key's concurrent places, if one is free (no await in between)."""
        if self.concurrency is not None and self.active >= self.concurrency:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1

    def fields(self) -> tuple[int, int | None, int | None, int | None, int | None]:
        day, month = self.quotas.get(DAY), self.quotas.get(MONTH)
        return (
            self.requests.limit,
            self.tokens.limit if self.tokens else None,
            self.concurrency,
            day.limit if day else None,
            month.limit if month else None,
        )

    def update(
        self,
        rpm: int,
        tpm: int | None,
        concurrency: int | None,
        daily: int | None = None,
        monthly: int | None = None,
    ) -> None:
        """A reload changed the key's fields: keep its history, apply the new limits."""
        self.requests.limit = rpm
        if tpm and self.tokens is not None:
            self.tokens.limit = tpm
        else:
            self.tokens = TokenWindow(tpm) if tpm else None
        self.concurrency = concurrency
        self._set_quotas(daily, monthly)

    @property
    def counts_tokens(self) -> bool:
        """Whether a request of this key reserves and settles tokens."""
        return self.tokens is not None or bool(self.quotas)

    def quota_refusal(self, tokens: int, wall: float) -> tuple[CalendarQuota, float] | None:
        """The first quota ``tokens`` do not fit in, with the wait; None when all fit."""
        for quota in self.quotas.values():
            wait = quota.fits(tokens, wall)
            if wait:
                return quota, wait
        return None

    def hold_quota(self, tokens: int, wall: float) -> QuotaHold:
        """Reserve ``tokens`` in every quota (after ``quota_refusal`` said they fit)."""
        periods = {}
        for kind, quota in self.quotas.items():
            periods[kind] = quota.roll(wall)
            quota.used += tokens
            if quota.shared is not None:
                quota.shared += tokens
        return QuotaHold(tokens, periods)

    def settle_quota(self, hold: QuotaHold, tokens: int) -> None:
        """The request used ``tokens`` of what ``hold`` reserved (in the periods it held)."""
        delta = tokens - hold.tokens
        hold.tokens = tokens
        for kind, period in hold.periods.items():
            quota = self.quotas.get(kind)
            if quota is not None and quota.period == period:
                quota.used = max(0, quota.used + delta)
                if quota.shared is not None:
                    quota.shared = max(0, quota.shared + delta)

    def headers(
        self,
        now: float,
        shared_requests: int | None = None,
        shared_tokens: int | None = None,
        wall: float | None = None,
    ) -> list[tuple[str, str]]:
        """OpenAI's x-ratelimit-* headers; ``shared_*``: counts over every replica (Redis).

        Keys with quotas also get the ``-tokens-day`` and ``-tokens-month`` trios.
        """
        remaining = self.requests.remaining(now)
        if shared_requests is not None:
            remaining = min(remaining, max(0, self.requests.limit - shared_requests))
        out = [
            ("x-ratelimit-limit-requests", str(self.requests.limit)),
            ("x-ratelimit-remaining-requests", str(remaining)),
            ("x-ratelimit-reset-requests", duration(self.requests.reset_in(now))),
        ]
        if self.tokens is not None:
            left = self.tokens.remaining(now)
            if shared_tokens is not None:
                left = min(left, max(0, self.tokens.limit - shared_tokens))
            out += [
                ("x-ratelimit-limit-tokens", str(self.tokens.limit)),
                ("x-ratelimit-remaining-tokens", str(left)),
                ("x-ratelimit-reset-tokens", duration(self.tokens.reset_in(now))),
            ]
        if self.quotas:
            wall = time.time() if wall is None else wall
            for kind, quota in self.quotas.items():
                out += [
                    (f"x-ratelimit-limit-tokens-{kind}", str(quota.limit)),
                    (f"x-ratelimit-remaining-tokens-{kind}", str(quota.remaining(wall))),
                    (f"x-ratelimit-reset-tokens-{kind}", duration(quota.reset_in(wall))),
                ]
        return out


class QueueFull(Exception):
    """No queue place: the whole queue, or this key's share of it, is taken."""

    def __init__(self, per_key: bool) -> None:
        super().__init__("queue full")
        self.per_key = per_key


class QueueTimeout(Exception):
    pass


class Admission:
    """At most ``limit`` slots in use; a bounded queue served round-robin by key.

    A request takes as many slots as llama-server will run tasks for it (choices times
    prompts). A key may hold at most ``per_key`` queue places, so one flooding key never
    locks the others out of the queue; waiters are granted one key at a time in turn, a
    key's turn lasting as many grants as its weight (its priority).
    """

    def __init__(self, limit: int, queue_size: int, timeout: float, per_key: int) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.timeout = timeout
        self.per_key = max(1, per_key)
        self.active = 0
        self.waiting = 0
        self._queues: OrderedDict[str, deque[tuple[asyncio.Future[None], int]]] = OrderedDict()
        self._weights: dict[str, int] = {}
        self._turn = ""  # the key whose turn it is, and the grants it had in this turn
        self._streak = 0

    async def acquire(self, key_id: str, slots: int = 1, weight: int = 1) -> None:
        if self.active + slots <= self.limit and not self.waiting:
            self.active += slots
            return
        if self.waiting >= self.queue_size:
            raise QueueFull(per_key=False)
        queue = self._queues.get(key_id)
        if queue is not None and len(queue) >= self.per_key:
            raise QueueFull(per_key=True)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (future, slots)
        self._queues.setdefault(key_id, deque()).append(entry)
        self._weights[key_id] = max(1, weight)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                # Granted just as we gave up: pass the slots on.
                self.release(slots)
            else:
                self._forget(key_id, entry)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout() from None
            raise

    def _forget(self, key_id: str, entry: tuple[asyncio.Future[None], int]) -> None:
        queue = self._queues.get(key_id)
        if queue is not None and entry in queue:
            queue.remove(entry)
            self.waiting -= 1
            if not queue:
                del self._queues[key_id]
                self._weights.pop(key_id, None)
                if self._turn == key_id:
                    self._turn = ""  # its turn ends with its last waiter
            # A large waiter leaving may let smaller ones behind it in.
            self._grant()

    def release(self, slots: int = 1) -> None:
        self.active -= slots
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to waiters, one key at a time in turn, weight grants per turn."""
        while self._queues:
            key_id, queue = next(iter(self._queues.items()))
            if key_id != self._turn:
                self._turn, self._streak = key_id, 0
            future, slots = queue[0]
            if future.done():  # cancelled, and its owner has not run yet
                queue.popleft()
                self.waiting -= 1
                if queue:
                    continue  # its next waiter keeps the key's turn
            elif self.active + slots > self.limit:
                return  # the next in turn waits for enough slots: no overtaking
            else:
                queue.popleft()
                self.waiting -= 1
                self.active += slots
                future.set_result(None)
                self._streak += 1
                if queue and self._streak < self._weights.get(key_id, 1):
                    continue
            self._turn = ""
            if queue:
                self._queues.move_to_end(key_id)
            else:
                del self._queues[key_id]
                self._weights.pop(key_id, None)
