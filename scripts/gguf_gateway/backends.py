"""Several llama-servers behind one gateway, and which one serves a request.

With BACKENDS=N the supervisor runs N llama-servers serving the same model (auto: one per
GPU, each seeing only its own), backend i on loopback port PORT_BACKEND + i. Admission
counts the sum of their slots; the router then sends each request to a backend with room:

* requests of one key whose prompts share a long prefix go to the backend that served
  that key's prefix last, where llama-server's prompt cache already holds it, unless that
  backend is full. The key id is part of the prefix's hash: another key sending the same
  prefix (a probe for a victim's system prompt) is not steered to the victim's cache;
* otherwise the backend with the most free slots (ties: the lowest index).

Only backends that answer their health poll are chosen while any does: one that stopped
answering (hung, not dead) is routed around until it answers again (readiness.py).
Requests that take no slot (models, tokenize) go to the least busy ready backend.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
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


def prefix_key(payload: Mapping[str, object], key_id: str) -> bytes | None:
    """A key for the start of ``key_id``'s prompt, when it is long enough to be worth a cache.

    ASCII-escaped JSON: a lone surrogate (``"\\ud800"`` in the body, which Python's JSON
    reader accepts) has no UTF-8 form, and encoding it here must not fail the request;
    llama-server judges the body itself.
    """
    prompt = payload.get("messages") or payload.get("prompt") or payload.get("input")
    if prompt is None:
        return None
    text = json.dumps(prompt, separators=(",", ":")).encode("ascii")
    if len(text) < PREFIX_BYTES:
        return None
    digest = hashlib.blake2b(digest_size=16, person=b"gguf-affinity")
    digest.update(key_id.encode("utf-8", "backslashreplace") + b"\n")
    digest.update(text[:PREFIX_BYTES])
    return digest.digest()


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
        candidates = self.routable()
        if key is not None:
            last = self._affinity.get(key)
            if last is not None:
                home = self.backends[last]
                if home.free >= slots and home in candidates:
                    chosen = home
        if chosen is None:
            chosen = max(candidates, key=lambda b: (b.free, -b.index))
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

    def routable(self) -> list[Backend]:
        """The ready backends; all of them when none is (a request then fails as it must)."""
        return [b for b in self.backends if b.state == "ready"] or self.backends

    def any(self) -> Backend:
        """A backend for a request that takes no slot: the least busy ready one."""
        chosen = min(self.routable(), key=lambda b: (b.in_use, b.index))
        chosen.served += 1
        return chosen
