"""The router over several llama-servers: slots, prompt-prefix affinity, overflow."""

from __future__ import annotations

from gguf_gateway.backend import BackendPool
from gguf_gateway.backends import PREFIX_BYTES, Backend, BackendSet, prefix_key


def two(slots: int = 2) -> BackendSet:
    return BackendSet(
        [
            Backend(i, 9000 + i, BackendPool("127.0.0.1", 9000 + i, 1.0), "ready", slots)
            for i in (0, 1)
        ]
    )


def chat(system: str, user: str) -> dict[str, object]:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_load_spreads_to_the_backend_with_most_free_slots() -> None:
    backends = two()
    first, second = backends.pick(1, None), backends.pick(1, None)
    assert {first.index, second.index} == {0, 1}
    backends.release(first, 1)
    assert backends.pick(1, None) is first


def test_a_shared_long_prefix_sticks_to_one_backend_until_it_is_full() -> None:
    backends = two()
    long_system = "You are a careful assistant. " * 40
    key_a = prefix_key(chat(long_system, "question one"))
    key_b = prefix_key(chat(long_system, "a different question"))
    assert key_a is not None and key_a == key_b
    home = backends.pick(1, key_a)
    assert backends.pick(1, key_b) is home  # warm cache wins over the emptier backend
    overflow = backends.pick(1, key_a)  # home is full (2 of 2): the other one takes it
    assert overflow is not home
    assert [b.served for b in backends] == ([2, 1] if home.index == 0 else [1, 2])


def test_short_prompts_have_no_affinity() -> None:
    assert prefix_key(chat("short", "hi")) is None
    assert prefix_key({"prompt": "x" * PREFIX_BYTES}) is not None
    assert prefix_key({"stream": True}) is None


def test_one_request_never_takes_more_than_one_backend_has() -> None:
    backends = two(slots=4)
    assert backends.most_slots == 4
    backends.backends[1].slots = None  # not known yet
    assert backends.most_slots is None
