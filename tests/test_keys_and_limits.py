"""Keys, scopes, per-key limits and admission, against the real llama-server."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import GatewayFactory, GatewayHandle
from gguf_gateway.keys import KeySource, parse_key_text
from support.procs import ROOT, wait_until

# ------------------------------------------------------------------ key file parsing


def test_malformed_lines_are_reported_by_number_without_the_secret() -> None:
    text = "\n".join(
        [
            "# comment",
            "good:sk-good-secret",
            "noseparator-sk-secret-one",
            "bad id:sk-secret-two",
            "neg:sk-secret-three rpm=-1",
            "unk:sk-secret-four color=blue",
            "hash:sha256:abc",
            "dup:sk-good-secret",
            "good:sk-other-secret",
            "exp:sk-secret-five expires=tomorrow",
            "adm:sk-secret-six scopes=admin",
        ]
    )
    keys, problems = parse_key_text(text, "keys.txt")
    assert [k.key_id for k in keys] == ["good", "adm"]
    assert keys[1].scopes == {"inference", "admin"}
    assert [p.split(":")[0] for p in problems] == [
        f"keys.txt line {n}" for n in (3, 4, 5, 6, 7, 8, 9, 10)
    ]
    secrets = ["sk-secret-", "sk-good-secret", "sk-other-secret", "noseparator", "abc"]
    for problem in problems:
        assert not any(secret in problem for secret in secrets), problem


def test_hashed_and_plain_keys_match_and_others_do_not(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    path = tmp_path / "keys"
    path.write_text(f"a:sk-plain\nb:sha256:{digest} rpm=5 tpm=100 concurrency=2\n")
    ring = KeySource(path).ring
    a, b = ring.match("sk-plain"), ring.match("sk-hashed")
    assert a is not None and a.key_id == "a"
    assert b is not None and (b.key_id, b.rpm, b.tpm, b.concurrency) == ("b", 5, 100, 2)
    assert ring.match("sk-other") is None and ring.match(digest) is None


def test_key_source_reloads_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("a:sk-one\n")
    source = KeySource(path)
    assert source.current(now=0).match("sk-one")
    path.write_text("b:sk-two\n")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    ring = source.current(now=5)
    assert ring.match("sk-one") is None and ring.match("sk-two")


# ------------------------------------------------------------------ key_mgmt.py


def key_mgmt(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "key_mgmt.py"), "--file", str(path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_key_mgmt_generate_list_rotate_revoke(tmp_path: Path) -> None:
    path = tmp_path / "api_keys.txt"
    path.write_text("# operators' keys\n")
    made = key_mgmt(path, "generate", "alice", "--rpm", "60", "--hashed")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("sk-") and secret not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("# operators' keys\n")
    assert KeySource(path).ring.match(secret) is not None

    plain = key_mgmt(path, "generate", "bob", "--scopes", "inference,admin").stdout.strip()
    listing = key_mgmt(path, "list")
    assert "alice" in listing.stdout and "bob" in listing.stdout and "rpm=60" in listing.stdout
    assert secret not in listing.stdout and plain not in listing.stdout

    rotated = key_mgmt(path, "rotate", "alice").stdout.strip()
    ring = KeySource(path).ring
    assert ring.match(secret) is None and ring.match(rotated) is not None
    assert "rpm=60" in path.read_text()

    assert key_mgmt(path, "revoke", "bob").returncode == 0
    assert KeySource(path).ring.match(plain) is None
    assert key_mgmt(path, "revoke", "bob").returncode == 1
    assert key_mgmt(path, "generate", "alice").returncode == 1
    bad = key_mgmt(path, "generate", "carol", "--scopes", "root")
    assert bad.returncode == 2 and "scopes" in bad.stderr


def test_key_mgmt_revokes_and_rotates_every_line_of_a_duplicated_id(tmp_path: Path) -> None:
    path = tmp_path / "api_keys.txt"
    path.write_text("dup:sk-first-secret\ndup:sk-second-secret rpm=5\nbroken sk-mistyped-secret\n")
    listing = key_mgmt(path, "list").stdout
    assert "sk-mistyped-secret" not in listing and "sk-first" not in listing
    rotated = key_mgmt(path, "rotate", "dup")
    assert rotated.returncode == 0, rotated.stderr
    text = path.read_text()
    assert "sk-first-secret" not in text and "sk-second-secret" not in text
    assert text.count("dup:") == 1
    assert key_mgmt(path, "revoke", "dup").returncode == 0
    assert "dup:" not in path.read_text()


# ------------------------------------------------------------------ limits, for real


def chat(
    port: int,
    key: str,
    *,
    tokens: int = 8,
    stream: bool = False,
    extra: dict[str, Any] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    payload: dict[str, Any] = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    payload.update(extra or {})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(payload),
            headers={"Authorization": f"Bearer {key}"},
        )
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def limited_gateway(
    make_gateway: GatewayFactory, tmp_path: Path, lines: str, **env: str
) -> GatewayHandle:
    keys = tmp_path / "limited_keys.txt"
    keys.write_text(lines)
    return make_gateway(AUTH_KEYS_FILE=str(keys), **env)


def test_rpm_boundary_returns_429_with_headers(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "r:sk-rate-limited rpm=3\n")
    for expected_remaining in ("2", "1", "0"):
        status, headers, _ = chat(gw.port, "sk-rate-limited", tokens=1)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == expected_remaining
    status, headers, body = chat(gw.port, "sk-rate-limited", tokens=1)
    assert status == 429 and json.loads(body)["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["retry-after"]) <= 60 and int(headers["retry-after-ms"]) > 0
    assert "x-should-retry" not in headers
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-rate-limited", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.models.list()


def test_token_limit_holds_under_16_parallel_requests(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(
        make_gateway, tmp_path, "t:sk-token-limited tpm=2500\n", MAX_QUEUE_SIZE="64"
    )
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: chat(gw.port, "sk-token-limited", tokens=200), range(16)))
    ok = [json.loads(body) for status, _, body in results if status == 200]
    refused = [headers for status, headers, _ in results if status == 429]
    assert ok and refused and len(ok) + len(refused) == 16
    assert sum(r["usage"]["total_tokens"] for r in ok) <= 2500
    assert all(h["x-ratelimit-limit-tokens"] == "2500" for h in refused)


def test_token_limit_counts_streams_and_hides_unrequested_usage(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "s:sk-stream-limited tpm=1000\n")
    status, _, body = chat(gw.port, "sk-stream-limited", tokens=300, stream=True)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert all(b'"choices":[]' not in e for e in events), "usage chunk was not asked for"
    status, headers, body = chat(
        gw.port,
        "sk-stream-limited",
        tokens=300,
        stream=True,
        extra={"stream_options": {"include_usage": True}},
    )
    assert status == 200
    usage = json.loads([e for e in body.split(b"\n\n") if b'"usage"' in e][-1][6:])["usage"]
    assert usage["completion_tokens"] == 300
    # Two streams settled at their real usage (about 330 each): a third of 300 does not fit.
    status, headers, _ = chat(gw.port, "sk-stream-limited", tokens=300, stream=True)
    assert status == 429 and int(headers["x-ratelimit-remaining-tokens"]) < 700


def test_request_that_can_never_fit_is_not_retried(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "n:sk-never-fits tpm=50\n")
    status, headers, _ = chat(gw.port, "sk-never-fits", tokens=100)
    assert status == 429 and headers["x-should-retry"] == "false"


def test_per_key_concurrency(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "c:sk-one-at-a-time concurrency=1\n")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, gw.port, "sk-one-at-a-time", tokens=4000)
        wait_until(lambda: gw.backend.busy_slots() == 1, 10, "the first request to run")
        second = chat(gw.port, "sk-one-at-a-time", tokens=4)
        assert second[0] == 429 and second[1]["retry-after"] == "1"
        assert first.result()[0] == 200


def test_reload_keeps_running_stream_and_applies_to_new_requests(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "old:sk-old-key-0000\n")
    keys = tmp_path / "limited_keys.txt"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(chat, gw.port, "sk-old-key-0000", tokens=6000, stream=True)
        wait_until(lambda: gw.backend.busy_slots() == 1, 10, "the stream to start")
        keys.write_text("new:sk-new-key-0000\n")
        wait_until(
            lambda: chat(gw.port, "sk-new-key-0000", tokens=1)[0] == 200, 5, "the new key to work"
        )
        assert chat(gw.port, "sk-old-key-0000", tokens=1)[0] == 401
        status, _, body = running.result()
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")


def one_slot_gateway(make_gateway: GatewayFactory, tmp_path: Path, **env: str) -> GatewayHandle:
    """A flooding and a quiet key in front of one slot."""
    return limited_gateway(
        make_gateway,
        tmp_path,
        "flood:sk-flooder-0000\nquiet:sk-quiet-00000\n",
        MAX_CONCURRENT_REQUESTS="1",
        QUEUE_TIMEOUT="300",  # a slow machine must not turn queueing into 503s
        **env,
    )


def test_fair_queue_serves_a_quiet_key_before_a_flooders_backlog(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = one_slot_gateway(make_gateway, tmp_path, MAX_QUEUE_PER_KEY="3")
    finished: list[str] = []

    def run(key: str, name: str) -> None:
        assert chat(gw.port, key, tokens=1500)[0] == 200
        finished.append(name)

    with ThreadPoolExecutor(8) as pool:
        floods = [pool.submit(run, "sk-flooder-0000", f"flood-{i}") for i in range(4)]
        wait_until(lambda: health(gw)["queue_depth"] == 3, 30, "the flooder's backlog to queue")
        quiet = pool.submit(run, "sk-quiet-00000", "quiet")
        for future in [*floods, quiet]:
            future.result()
    assert finished.index("quiet") <= 2, finished


def test_a_flooding_key_cannot_take_every_queue_place(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = one_slot_gateway(make_gateway, tmp_path, MAX_QUEUE_SIZE="4")
    with ThreadPoolExecutor(8) as pool:
        floods = [pool.submit(chat, gw.port, "sk-flooder-0000", tokens=1500) for _ in range(6)]
        # One running, two queued (half of MAX_QUEUE_SIZE), the rest refused at once.
        wait_until(lambda: health(gw)["queue_depth"] == 2, 30, "the flooder's share to queue")
        quiet = pool.submit(chat, gw.port, "sk-quiet-00000", tokens=1500)
        statuses = sorted(f.result()[0] for f in floods)
        assert quiet.result()[0] == 200
    assert statuses == [200, 200, 200, 503, 503, 503]


def health(gw: GatewayHandle) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("GET", "/health")
    result: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.close()
    return result


def test_full_queue_is_503_with_retry_after(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = limited_gateway(
        make_gateway,
        tmp_path,
        "q:sk-queue-test-00\n",
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUE_SIZE="1",
    )
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(chat, gw.port, "sk-queue-test-00", tokens=3000) for _ in range(2)]
        wait_until(lambda: health(gw)["queue_depth"] == 1, 10, "one request to queue")
        status, headers, body = chat(gw.port, "sk-queue-test-00", tokens=4)
        assert status == 503 and headers["retry-after"]
        assert "queue is full" in json.loads(body)["error"]["message"]
        assert [f.result()[0] for f in running] == [200, 200]


def test_no_secret_ever_reaches_the_logs(gateway: GatewayHandle) -> None:
    from conftest import ALICE, BACKEND_KEY, EXPIRED, HASHED, OPS

    chat(gateway.port, "sk-not-a-real-key", tokens=1)
    chat(gateway.port, ALICE, tokens=1)
    # The access line is written once the response is out, a moment after the client has it.
    wait_until(lambda: " alice " in gateway.proc.log(), 5, "the access line")
    log = gateway.proc.log()
    for secret in (ALICE, OPS, HASHED, EXPIRED, BACKEND_KEY, "sk-not-a-real-key"):
        assert secret not in log
    assert "alice" in log  # key ids are logged


def test_sighup_reloads_keys_at_once(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    import signal

    gw = limited_gateway(make_gateway, tmp_path, "one:sk-first-key-000\n")
    keys = tmp_path / "limited_keys.txt"
    stat_before = keys.stat()
    keys.write_text("two:sk-second-key-00\n")
    # Same size and mtime as before: only the signal can tell the gateway.
    os.utime(keys, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    gw.proc.signal(signal.SIGHUP)
    wait_until(lambda: "keys reloaded" in gw.proc.log(), 5, "the reload")
    assert chat(gw.port, "sk-second-key-00", tokens=1)[0] == 200
    assert chat(gw.port, "sk-first-key-000", tokens=1)[0] == 401


@pytest.mark.parametrize("breakage", ["missing", "not-utf8"])
def test_a_reload_while_api_key_file_is_broken_keeps_its_key(
    make_gateway: GatewayFactory, tmp_path: Path, breakage: str
) -> None:
    """API_KEY_FILE's key, like the key file's, outlives a reload that cannot read it
    (it was revoked until the next reload, and a non-UTF-8 file escaped as a traceback)."""
    import signal

    single = tmp_path / "api_key"
    single.write_text("sk-single-file-key-00\n")
    gw = make_gateway(API_KEY_FILE=str(single))
    assert chat(gw.port, "sk-single-file-key-00", tokens=1)[0] == 200
    single.unlink()
    if breakage == "not-utf8":
        single.write_bytes(b"sk-single-file-key-00\xff\n")
    gw.proc.signal(signal.SIGHUP)
    wait_until(lambda: "keys reloaded" in gw.proc.log(), 10, "the reload")
    assert "keeping the last good key" in gw.proc.log()
    assert chat(gw.port, "sk-single-file-key-00", tokens=1)[0] == 200
    assert "sk-single-file-key-00" not in gw.proc.log()
    # An empty file still revokes it.
    single.write_text("")
    gw.proc.signal(signal.SIGHUP)
    wait_until(lambda: gw.proc.log().count("keys reloaded") >= 2, 10, "the second reload")
    assert chat(gw.port, "sk-single-file-key-00", tokens=1)[0] == 401


@pytest.mark.parametrize("breakage", ["missing", "a-directory", "not-utf8"])
def test_a_reload_while_the_key_file_is_broken_keeps_the_last_good_keys(
    make_gateway: GatewayFactory, tmp_path: Path, breakage: str
) -> None:
    import signal

    gw = limited_gateway(make_gateway, tmp_path, "keep:sk-keep-this-key-0\n")
    keys = tmp_path / "limited_keys.txt"
    assert chat(gw.port, "sk-keep-this-key-0", tokens=1)[0] == 200
    keys.unlink()
    if breakage == "a-directory":
        keys.mkdir()  # the mtime check sees a change; reading it fails
    elif breakage == "not-utf8":
        keys.write_bytes(b"keep:sk-keep-this-key-0\n\xff\xfe\n")
    gw.proc.signal(signal.SIGHUP)
    wait_until(lambda: "keeping the last good keys" in gw.proc.log(), 10, "the warning")
    wait_until(lambda: "keys reloaded" in gw.proc.log(), 10, "the reload")
    time.sleep(1.1)  # past the once-a-second mtime check, which must keep them too
    assert chat(gw.port, "sk-keep-this-key-0", tokens=1)[0] == 200
    assert "WARNING" in gw.proc.log() or "warning" in gw.proc.log().lower()
    assert "sk-keep-this-key-0" not in gw.proc.log()
