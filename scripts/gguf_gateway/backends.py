"""Several llama-servers behind one gateway, and which one serves a request.

With BACKENDS=N the supervisor runs N llama-servers serving the same model (auto: one per
GPU, each seeing only its own), backend i on loopback port PORT_BACKEND + i. Admission
counts the sum of their slots; the router then sends each request to a backend with room:

* requests whose prompts share a long prefix go to the backend that served that prefix
  last, where llama-server's prompt cache already holds it, unless that backend is full;
* otherwise the backend with the most free slots (ties: the lowest index).

Requests that take no slot (models, tokenize) go to the least busy ready backend.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field

from .backend import BackendPool

# A prompt shorter than this has nothing worth caching; a longer one is keyed on this
# much of its beginning (system prompt, tools, earlier turns).
PREFIX_BYTES = 512
MAX_AFFINITIES = 4096


@dataclass
class Backend:
    index: int
    port: int
    pool: BackendPool
    state: str = "starting"  # starting | loading | ready | down
    slots: int | None = None  # llama-server's total_slots
    ctx: int | None = None  # context per slot
    in_use: int = 0  # slots the gateway has given out here
    served: int = 0  # requests routed here (gateway_backend_requests_total)
    models: list[str] = field(default_factory=list)

    @property
    def free(self) -> int:
        return (self.slots or 1) - self.in_use


def prefix_key(payload: dict[str, object]) -> bytes | None:
    """A key for the start of the prompt, when it is long enough to be worth a cache."""
    prompt = payload.get("messages") or payload.get("prompt") or payload.get("input")
    if prompt is None:
        return None
    text = json.dumps(prompt, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) < PREFIX_BYTES:
        return None
    return hashlib.blake2b(text[:PREFIX_BYTES], digest_size=16).digest()


class BackendSet:
    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self._affinity: OrderedDict[bytes, int] = OrderedDict()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.backends)

    def __len__(self) -> int:
        return len(self.backends)

    @property
    def most_slots(self) -> int | None:
        """The most tasks one request can run at once: every task runs on one backend."""
        known = [b.slots for b in self.backends if b.slots]
        return min(known) if len(known) == len(self.backends) else None

    def pick(self, slots: int, key: bytes | None) -> Backend:
        """The backend for a request that takes ``slots`` slots (admission let it in)."""
        chosen: Backend | None = None
        if key is not None:
            last = self._affinity.get(key)
            if last is not None and self.backends[last].free >= slots:
                chosen = self.backends[last]
        if chosen is None:
            chosen = max(self.backends, key=lambda b: (b.free, -b.index))
        if key is not None:
            self._affinity[key] = chosen.index
            self._affinity.move_to_end(key)
            if len(self._affinity) > MAX_AFFINITIES:
                self._affinity.popitem(last=False)
        chosen.in_use += slots
        chosen.served += 1
        return chosen

    def release(self, backend: Backend, slots: int) -> None:
        backend.in_use -= slots

    def any(self) -> Backend:
        """A backend for a request that takes no slot: the least busy ready one."""
        ready = [b for b in self.backends if b.state == "ready"] or self.backends
        chosen = min(ready, key=lambda b: (b.in_use, b.index))
        chosen.served += 1
        return chosen
