"""Operators' key controls without a server: key fields, API_KEYS, calendar quotas (the
clock passed in), the ledger's charges, model listings and the priority-weighted queue."""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gguf_gateway.keys import KeySource, env_entries, parse_key_entries, parse_key_line
from gguf_gateway.ledger import charges
from gguf_gateway.limits import (
    DAY,
    MONTH,
    Admission,
    KeyLimits,
    duration,
    period_end,
    period_of,
)
from gguf_gateway.model_scope import filter_listing, query_models


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> float:
    return float(calendar.timegm((year, month, day, hour, minute, sec)))


# ------------------------------------------------------------------ key fields


def test_key_line_reads_models_quotas_and_priority() -> None:
    key = parse_key_line(
        "t:sk-tenant models=tiny,big daily_tokens=5000 monthly_tokens=90000 priority=3"
    )
    assert (
        key.models == frozenset({"tiny", "big"})
        and key.may_use("tiny")
        and not key.may_use("other")
    )
    assert (key.daily_tokens, key.monthly_tokens, key.priority) == (5000, 90000, 3)
    plain = parse_key_line("p:sk-plain")
    assert plain.models is None and plain.may_use("anything") and plain.priority == 1
    assert not plain.has_quota and key.has_quota


@pytest.mark.parametrize(
    "fields, named",
    [
        pytest.param("priority=0", "priority", id="priority-zero"),
        pytest.param("priority=11", "priority", id="priority-over-ten"),
        pytest.param("priority=high", "priority", id="priority-word"),
        pytest.param("daily_tokens=-5", "daily_tokens", id="daily-negative"),
        pytest.param("monthly_tokens=1e6", "monthly_tokens", id="monthly-float"),
        pytest.param("models=,", "models", id="models-empty"),
        pytest.param("models=a,b models=c", "models", id="models-twice"),
    ],
)
def test_bad_control_fields_are_named(fields: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_key_line(f"k:sk-secret-value {fields}")


# ------------------------------------------------------------------ API_KEYS


def test_api_keys_entries_split_on_semicolons_and_newlines_named_by_position() -> None:
    digest = hashlib.sha256(b"sk-env-hashed").hexdigest()
    text = f"a:sk-env-one rpm=5; b:sha256:{digest}\nbroken-sk-env-secret;;c:sk-env-three tpm=x"
    keys, problems = parse_key_entries(env_entries(text))
    assert [k.key_id for k in keys] == ["a", "b"]
    assert problems == [
        "API_KEYS entry 3: expected key_id:secret; skipped",
        "API_KEYS entry 5: tpm must be a positive whole number; skipped",
    ]
    assert all("sk-env" not in p for p in problems)


def test_key_source_takes_the_file_and_api_keys_together(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("file:sk-from-file\nsame:sk-file-same\n")
    logged: list[str] = []
    source = KeySource(
        path,
        log=logged.append,
        api_keys="env:sk-from-env daily_tokens=10;same:sk-env-same;dup:sk-from-file",
    )
    ring = source.ring
    assert {k.key_id for k in ring.keys} == {"file", "same", "env"}
    found = ring.match("sk-from-env")
    assert found is not None and found.daily_tokens == 10
    assert ring.match("sk-env-same") is None  # the file's "same" wins
    assert logged == [
        "API_KEYS entry 2: duplicate key id 'same'; skipped",
        "API_KEYS entry 3: key 'dup' repeats an earlier secret; skipped",
    ]
    path.unlink()  # no file at all: API_KEYS alone still works
    source.reload()
    assert source.ring.match("sk-from-env") is not None


# ------------------------------------------------------------------ calendar quotas


def test_periods_are_utc_days_and_months() -> None:
    wall = utc(2026, 12, 31, 23, 59, 59)
    assert period_of(DAY, wall) == "2026-12-31" and period_of(MONTH, wall) == "2026-12"
    assert period_end(DAY, wall) == utc(2027, 1, 1) == period_end(MONTH, wall)
    assert period_end(MONTH, utc(2027, 2, 10)) == utc(2027, 3, 1)
    assert duration(3 * 3600 + 61) == "3h1m1s" and duration(59.2) == "1m0s"


def test_daily_quota_reserves_settles_and_rolls_over_at_midnight() -> None:
    limits = KeyLimits(100, None, None, daily=1000, monthly=1500)
    evening = utc(2026, 12, 2, 23, 59, 0)
    hold = limits.hold_quota(800, evening)
    assert limits.quota_refusal(300, evening) == (limits.quotas[DAY], 60.0)
    limits.settle_quota(hold, 700)  # used less than reserved
    assert limits.quotas[DAY].remaining(evening) == 300
    assert limits.quota_refusal(300, evening) is None
    late = limits.hold_quota(300, evening)
    assert limits.quota_refusal(1, evening) is not None
    # Midnight: a new day, the same month; the late request settles in the day it began.
    morning = utc(2026, 12, 3, 0, 0, 5)
    assert limits.quotas[DAY].remaining(morning) == 1000
    limits.settle_quota(late, 100)
    assert limits.quotas[DAY].remaining(morning) == 1000
    assert limits.quotas[MONTH].remaining(morning) == 1500 - 800
    over = limits.quota_refusal(900, morning)
    assert over is not None and over[0].kind == MONTH and over[1] == utc(2027, 1, 1) - morning
    never = limits.quota_refusal(1001, morning)
    assert never is not None and math.isinf(never[1])
    names = dict(limits.headers(0.0, wall=morning))
    assert names["x-ratelimit-remaining-tokens-day"] == "1000"
    assert names["x-ratelimit-remaining-tokens-month"] == "700"
    assert names["x-ratelimit-reset-tokens-day"] == duration(86400 - 5)


def test_a_key_gaining_or_losing_a_quota_keeps_the_other() -> None:
    limits = KeyLimits(100, None, None, daily=10)
    limits.hold_quota(5, utc(2026, 12, 2))
    limits.update(100, None, None, daily=20, monthly=30)
    assert limits.quotas[DAY].remaining(utc(2026, 12, 2)) == 15
    limits.update(100, None, None)
    assert not limits.counts_tokens and "tokens-day" not in str(limits.headers(0.0))


# ------------------------------------------------------------------ the ledger's charges


def ledger_line(ts: str, key: str, prompt: int, completion: int, **more: object) -> str:
    entry = {"ts": ts, "key_id": key, "prompt_tokens": prompt, "completion_tokens": completion}
    entry.update(more)
    return json.dumps(entry, separators=(",", ":")) + "\n"


def test_charges_sum_today_and_this_month_from_the_ledger_and_its_archives(
    tmp_path: Path,
) -> None:
    now = utc(2026, 12, 15, 12)
    ledger = tmp_path / "usage.jsonl"
    archive = tmp_path / "usage.jsonl.1"
    old = tmp_path / "usage.jsonl.2"
    archive.write_text(
        ledger_line("2026-11-30T23:59:59Z", "a", 1000, 1000)  # last month
        + ledger_line("2026-12-01T00:00:01Z", "a", 10, 5)
    )
    ledger.write_text(
        ledger_line("2026-12-14T10:00:00Z", "a", 1, 2)
        + ledger_line("2026-12-15T01:00:00Z", "a", 3, 4)
        # A client that left: the reserved bound was charged, not the usage reported.
        + ledger_line("2026-12-15T02:00:00Z", "a", None, None, charged_tokens=50)  # type: ignore[arg-type]
        + ledger_line("2026-12-15T03:00:00Z", "b", 7, 0)
        + '{"ts":"2026-12-15T04:00:00Z","key_id":"a","prompt_tok'  # cut by a crash
    )
    old.write_text(ledger_line("2026-12-15T05:00:00Z", "a", 100, 100))
    # The oldest archive was last written last month: it cannot hold this month's lines.
    os.utime(old, (utc(2026, 11, 20), utc(2026, 11, 20)))
    day, month, totals = charges(ledger, now)
    assert (day, month) == ("2026-12-15", "2026-12")
    assert totals == {"a": (7 + 50, 15 + 3 + 7 + 50), "b": (7, 7)}


# ------------------------------------------------------------------ model listings


def test_listings_keep_only_the_keys_models() -> None:
    body = json.dumps(
        {
            "object": "list",
            "models": [{"name": "tiny", "model": "tiny"}, {"name": "big", "model": "big"}],
            "data": [
                {"id": "tiny", "aliases": []},
                {"id": "big", "aliases": ["large"]},
                {"id": "other"},
                "junk",
            ],
        }
    ).encode()
    kept = json.loads(filter_listing(body, {"tiny", "large"}))
    assert [m["id"] for m in kept["data"]] == ["tiny", "big"]
    assert [m["name"] for m in kept["models"]] == ["tiny"]
    assert json.loads(filter_listing(body, set()))["data"] == []
    assert filter_listing(b"not json", {"tiny"}) == b"not json"
    assert query_models("model=a&autoload=1&model=b") == ["a", "b"]
    assert query_models("format=json") == []


# ------------------------------------------------------------------ priority


async def grant_order(weights: dict[str, int], each: int) -> list[str]:
    """The order one slot is granted to keys that each keep ``each`` requests queued."""
    admission = Admission(limit=1, queue_size=1000, timeout=60, per_key=1000)
    await admission.acquire("holder")  # occupies the one slot while the others queue
    order: list[str] = []

    async def one(key: str) -> None:
        await admission.acquire(key, 1, weights[key])
        order.append(key)
        admission.release()

    tasks = [asyncio.create_task(one(key)) for _ in range(each) for key in weights]
    while admission.waiting < len(tasks):
        await asyncio.sleep(0)
    admission.release()  # the holder leaves: queued requests run one at a time
    await asyncio.gather(*tasks)
    return order


@settings(max_examples=60, deadline=None)
@given(
    high=st.integers(min_value=1, max_value=10),
    low=st.integers(min_value=1, max_value=10),
    rounds=st.integers(min_value=1, max_value=4),
)
def test_two_saturating_keys_are_served_in_the_ratio_of_their_priorities(
    high: int, low: int, rounds: int
) -> None:
    each = (high + low) * rounds  # neither key runs dry while the ratio is measured
    order = asyncio.run(grant_order({"a": high, "b": low}, each))
    # While both keys wait, every turn gives each key exactly its weight in grants.
    both = order[: rounds * (high + low)]
    assert both.count("a") * low == both.count("b") * high
    for start in range(0, len(both), high + low):
        window = both[start : start + high + low]
        assert window.count("a") == high and window.count("b") == low
    assert sorted(order) == sorted(["a"] * each + ["b"] * each)


def test_priority_does_not_lift_a_keys_queue_share() -> None:
    async def run() -> None:
        admission = Admission(limit=1, queue_size=10, timeout=60, per_key=2)
        await admission.acquire("holder")
        waiting = [asyncio.create_task(admission.acquire("vip", 1, 10)) for _ in range(2)]
        while admission.waiting < 2:
            await asyncio.sleep(0)
        with pytest.raises(Exception, match="queue full"):
            await admission.acquire("vip", 1, 10)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(run())


# ------------------------------------------------------------------ start.sh counts API_KEYS


def test_the_supervisors_no_key_check_counts_api_keys(tmp_path: Path) -> None:
    from test_start_functions import sourced

    env = {"DATA_DIR": str(tmp_path), "AUTH_KEYS_FILE": str(tmp_path / "absent.txt")}
    none = sourced('load_facts; echo "keys=$KEY_COUNT"', env)
    assert none.returncode == 2 and "API_KEYS" in none.stderr
    env["API_KEYS"] = "a:sk-start-one;b:sk-start-two"
    given = sourced('load_facts; echo "keys=$KEY_COUNT"', env)
    assert given.returncode == 0, given.stderr
    assert given.stdout.strip().endswith("keys=2")


# ------------------------------------------------------------------ access control, clock in hand


def test_access_control_seeds_from_the_ledger_and_rolls_over_with_the_clock(
    tmp_path: Path,
) -> None:
    from gguf_gateway.access import AccessControl
    from gguf_gateway.config import Config
    from gguf_gateway.refusals import Refusal
    from gguf_gateway.responses import Exchange, Responder

    (tmp_path / "usage.jsonl").write_text(
        ledger_line("2026-12-31T10:00:00Z", "q", 0, 0, charged_tokens=600)
        + ledger_line("2026-12-30T10:00:00Z", "q", 0, 0, charged_tokens=50)
    )
    clock = [utc(2026, 12, 31, 23, 59, 30)]
    config = Config(log_dir=tmp_path)
    keys = KeySource(tmp_path / "none.txt", api_keys="q:sk-quota-clock daily_tokens=1000")
    access = AccessControl(config, keys, clock=lambda: clock[0])
    key = keys.ring.match("sk-quota-clock")
    assert key is not None

    def out() -> Responder:
        return Responder(None, Exchange("r", "POST", "/v1/chat/completions", 0.0))  # type: ignore[arg-type]

    async def run() -> None:
        limits = access.limits_for(key)
        first = await access.enter(key, limits, out())
        await access.reserve_tokens(first, 300, out())  # 600 from the ledger + 300
        second = await access.enter(key, limits, out())
        refused = out()
        with pytest.raises(Refusal) as over:
            await access.reserve_tokens(second, 200, refused)
        assert over.value.status == 429 and over.value.code == "insufficient_quota"
        headers = dict(over.value.headers)
        assert headers["Retry-After"] == "30" and "x-should-retry" not in headers
        shown = dict(refused.ex.rate_headers)
        assert shown["x-ratelimit-remaining-tokens-day"] == "100"
        assert shown["x-ratelimit-reset-tokens-day"] == "30s"
        clock[0] = utc(2027, 1, 1, 0, 0, 1)  # a new day
        await access.reserve_tokens(second, 900, out())
        await access.settle(first, 250)  # settles in the old day: the new one is untouched
        info = await access.describe(key)
        data = info["data"]
        assert isinstance(data, dict)
        assert data["usage"]["tokens_today"] == 900
        assert data["resets"]["day"] == "2027-01-02T00:00:00Z"

    asyncio.run(run())
