"""Per-key request and token limits, and slot-aware admission with a fair queue.

Requests per minute use a sliding 60 s window of timestamps, so memory per key is bounded
by its limit. Tokens per minute are reserved before the request goes out (an upper bound of what
llama-server can do for that body, see tokens.py) and settled to the ``usage``
llama-server reports, so a burst of parallel requests cannot overshoot the limit while
each is still running.

Admission caps requests in flight at llama-server's slot count: more would only queue
inside llama-server, where a waiting request holds a connection but shows nowhere. A
request counts for every task it makes llama-server run. Waiters are served round-robin
across keys, and one key holds at most MAX_QUEUE_PER_KEY places, so a tenant flooding the
queue delays the others by at most one turn each and never fills it for them.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from dataclasses import dataclass

WINDOW = 60.0


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
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class KeyLimits:
    """Everything tracked for one key id."""

    __slots__ = ("requests", "tokens", "concurrency", "active")

    def __init__(self, rpm: int, tpm: int | None, concurrency: int | None) -> None:
        self.requests = RequestWindow(rpm)
        self.tokens = TokenWindow(tpm) if tpm else None
        self.concurrency = concurrency
        self.active = 0

    def enter(self) -> bool:
        """Take one of the key's concurrent places, if one is free (no await in between)."""
        if self.concurrency is not None and self.active >= self.concurrency:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1

    def update(self, rpm: int, tpm: int | None, concurrency: int | None) -> None:
        """A reload changed the key's fields: keep its history, apply the new limits."""
        self.requests.limit = rpm
        if tpm and self.tokens is not None:
            self.tokens.limit = tpm
        else:
            self.tokens = TokenWindow(tpm) if tpm else None
        self.concurrency = concurrency

    def headers(
        self,
        now: float,
        shared_requests: int | None = None,
        shared_tokens: int | None = None,
    ) -> list[tuple[str, str]]:
        """OpenAI's x-ratelimit-* headers; ``shared_*``: counts over every replica (Redis)."""
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
    locks the others out of the queue; waiters are granted one key at a time in turn.
    """

    def __init__(self, limit: int, queue_size: int, timeout: float, per_key: int) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.timeout = timeout
        self.per_key = max(1, per_key)
        self.active = 0
        self.waiting = 0
        self._queues: OrderedDict[str, deque[tuple[asyncio.Future[None], int]]] = OrderedDict()

    async def acquire(self, key_id: str, slots: int = 1) -> None:
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
            # A large waiter leaving may let smaller ones behind it in.
            self._grant()

    def release(self, slots: int = 1) -> None:
        self.active -= slots
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to waiters, one key at a time in turn."""
        while self._queues:
            key_id, queue = next(iter(self._queues.items()))
            future, slots = queue[0]
            if future.done():  # cancelled, and its owner has not run yet
                queue.popleft()
                self.waiting -= 1
            elif self.active + slots > self.limit:
                return  # the next in turn waits for enough slots: no overtaking
            else:
                queue.popleft()
                self.waiting -= 1
                self.active += slots
                future.set_result(None)
            if queue:
                self._queues.move_to_end(key_id)
            else:
                del self._queues[key_id]
