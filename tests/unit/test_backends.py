"""The router over several llama-servers: slots, prompt-prefix affinity, overflow."""

from __future__ import annotations

import json

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
    key_a = prefix_key(chat(long_system, "question one"), "alice")
    key_b = prefix_key(chat(long_system, "a different question"), "alice")
    assert key_a is not None and key_a == key_b
    home = backends.pick(1, key_a)
    assert backends.pick(1, key_b) is home  # warm cache wins over the emptier backend
    overflow = backends.pick(1, key_a)  # home is full (2 of 2): the other one takes it
    assert overflow is not home
    assert [b.served for b in backends] == ([2, 1] if home.index == 0 else [1, 2])


def test_short_prompts_have_no_affinity() -> None:
    assert prefix_key(chat("short", "hi"), "alice") is None
    assert prefix_key({"prompt": "x" * PREFIX_BYTES}, "alice") is not None
    assert prefix_key({"stream": True}, "alice") is None


def test_another_key_with_the_same_prefix_is_not_sent_to_its_warm_cache() -> None:
    # A probe for a victim's system prompt must not be steered to the victim's backend.
    long_system = "The secret is 4711. " * 40
    victim = prefix_key(chat(long_system, "hello"), "victim")
    probe = prefix_key(chat(long_system, "hello"), "attacker")
    assert victim is not None and probe is not None and victim != probe
    backends = two()
    home = backends.pick(1, victim)
    assert backends.pick(1, probe) is not home  # the emptier one: no affinity of its own


def test_a_lone_surrogate_in_the_prompt_still_has_a_prefix_key() -> None:
    # json.loads accepts "\ud800"; its text has no UTF-8 form (it used to raise here).
    payload: dict[str, object] = json.loads('{"prompt": "' + "x" * PREFIX_BYTES + '\\ud800"}')
    assert prefix_key(payload, "alice") is not None
    assert prefix_key(json.loads('{"prompt": "\\ud800"}'), "alice") is None


def test_an_unresponsive_backend_is_routed_around_until_it_answers() -> None:
    backends = two()
    backends.backends[0].state = "unresponsive"
    long_prompt = {"prompt": "y" * PREFIX_BYTES}
    key = prefix_key(long_prompt, "alice")
    assert [backends.pick(1, None).index for _ in range(3)] == [1, 1, 1]
    assert backends.pick(1, key).index == 1 and backends.any().index == 1
    backends.backends[0].state = "ready"
    assert backends.pick(1, None).index == 0


def test_one_request_never_takes_more_than_one_backend_has() -> None:
    backends = two(slots=4)
    assert backends.most_slots == 4
    backends.backends[1].slots = None  # not known yet
    assert backends.most_slots is None
