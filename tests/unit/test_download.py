"""Parallel ranged downloads: scripts/fetch_model.py against the stand-in Hub, on loopback.

Small files with a small part size (the GATEWAY_DOWNLOAD_PART_BYTES knob) exercise the same
paths a multi-GB model takes: parts in parallel, stalls, a server without Range, kills and
restarts, a changed commit, a full disk, a listing that lies about a size, and a redirect
from https to http.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gguf_gateway.download import carries_token
from support.fake_hub import FakeHub, HubRepo
from support.procs import ROOT

PART = 64 * 1024
TOKEN = "hf_test_token_with_access"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def model_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


BIG = model_bytes(40 * PART + 1234)  # 41 parts, the last one short
NAME = "Tiny-Q4_K_M.gguf"


def env_for(data_dir: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "DATA_DIR": str(data_dir),
        "HF_ENDPOINT": endpoint,
        "MODEL_REPO": "owner/tiny",
        "GATEWAY_DOWNLOAD_PART_BYTES": str(PART),
        "DOWNLOAD_CONNECTIONS": "4",
    }
    env.update(extra)
    return env


def fetch(data_dir: Path, endpoint: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_model.py")],
        env=env_for(data_dir, endpoint, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_fetch(data_dir: Path, endpoint: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "fetch_model.py")],
        env=env_for(data_dir, endpoint, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def blob_dir(data_dir: Path) -> Path:
    return data_dir / "huggingface" / "hub" / "models--owner--tiny" / "blobs"


def recorded_parts(data_dir: Path) -> int:
    """Parts the sidecar says are on disk (its first line is the header)."""
    sidecars = (
        list(blob_dir(data_dir).glob("*.incomplete.parts")) if blob_dir(data_dir).is_dir() else []
    )
    if not sidecars:
        return 0
    text = sidecars[0].read_text()
    return max(0, text.count("\n") - 1)  # whole lines only: a torn last one is no part


def kill_after_parts(proc: subprocess.Popen[str], data_dir: Path, parts: int) -> bool:
    """SIGKILL once the sidecar holds ``parts`` parts; False if it finished first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if recorded_parts(data_dir) >= parts:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            return True
        time.sleep(0.01)
    proc.communicate(timeout=60)
    return False


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub({"owner/tiny": HubRepo({NAME: BIG}, commit=COMMIT_A)}).start()
    try:
        yield server
    finally:
        server.stop()


def test_parallel_parts_make_the_file_byte_for_byte(hub: FakeHub, tmp_path: Path) -> None:
    hub.first_byte_delay = 0.2  # every part waits, so parts overlap on any machine
    result = fetch(tmp_path, hub.url)
    assert result.returncode == 0, result.stderr
    hub.settle()
    path = Path(result.stdout.strip())
    assert path.read_bytes() == BIG
    asked = sorted((t.start, t.end) for t in hub.transfers)
    # Requests of whole parts (several at first, one each at the end) tile the file.
    assert [a for a, _ in asked] == [0] + [b for _, b in asked[:-1]] and asked[-1][1] == len(BIG)
    assert all(a % PART == 0 for a, _ in asked) and len(asked) < 41
    assert hub.sent() == len(BIG)  # nothing fetched twice
    assert hub.max_active > 1  # the parts really went in parallel
    assert "connection(s)" in result.stderr and "MB/s" in result.stderr
    assert not list(blob_dir(tmp_path).glob("*.incomplete*"))


def test_a_stalled_part_is_asked_for_again_from_where_it_stopped(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.stall = {3}  # the fourth part sends half, then nothing, holding the connection
    result = fetch(tmp_path, hub.url, GATEWAY_DOWNLOAD_STALL_SECONDS="1")
    assert result.returncode == 0, result.stderr
    hub.settle()
    assert Path(result.stdout.strip()).read_bytes() == BIG
    stalled = [t for t in hub.transfers if t.sent < t.end - t.start]
    assert len(stalled) == 1
    first = stalled[0]
    again = [t for t in hub.transfers if t.start == first.start + first.sent]
    assert again, "nothing asked again from where the stalled part stopped"
    assert "stalled" in result.stderr
    assert hub.sent() == len(BIG)  # the stalled half is all that was asked for again


def test_a_server_without_range_support_gets_one_stream(hub: FakeHub, tmp_path: Path) -> None:
    hub.ignore_range = True
    result = fetch(tmp_path, hub.url)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == BIG
    assert "ignores Range" in result.stderr
    hub.settle()
    # One plain GET carried the whole file (the server's threads may log the ranged tries
    # that were already on their way after it).
    plain = [h for _, p, h in hub.requests if "/resolve/" in p and "Range" not in h]
    assert len(plain) == 1
    assert any(t.start == 0 and t.sent == len(BIG) for t in hub.transfers)


def test_a_small_file_takes_one_stream(hub: FakeHub, tmp_path: Path) -> None:
    result = fetch(tmp_path, hub.url, GATEWAY_DOWNLOAD_PART_BYTES=str(len(BIG)))
    assert result.returncode == 0, result.stderr
    assert [(t.start, t.end) for t in hub.transfers] == [(0, len(BIG))]


def test_kills_at_random_points_cost_at_most_the_parts_in_flight(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.connection_rate = 1_000_000  # about 1 s for the file over 4 connections
    seed = int.from_bytes(os.urandom(4), "big")
    chance = random.Random(seed)
    connections = 4
    kills = 0
    # After each kill: where the stand-in's log stood, and the parts the sidecar vouched for.
    checkpoints: list[tuple[int, set[int]]] = []
    for _ in range(4):
        proc = start_fetch(tmp_path, hub.url, DOWNLOAD_CONNECTIONS=str(connections))
        already = recorded_parts(tmp_path)
        time.sleep(chance.uniform(0, 0.05))
        if not kill_after_parts(proc, tmp_path, already + chance.randint(1, 8)):
            break
        kills += 1
        hub.settle()  # the killed run's transfers have all ended and been logged
        sidecar = next(blob_dir(tmp_path).glob("*.incomplete.parts")).read_text()
        whole = sidecar[: sidecar.rfind("\n") + 1].splitlines()[1:]
        checkpoints.append((len(hub.transfers), {int(n) for n in whole}))
    result = fetch(tmp_path, hub.url, DOWNLOAD_CONNECTIONS=str(connections))
    assert result.returncode == 0, f"seed {seed}: {result.stderr}"
    hub.settle()
    path = Path(result.stdout.strip())
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(BIG).digest()
    assert kills >= 2, f"seed {seed}: the download finished before it could be killed"
    # Exact: no part recorded before a kill was fetched again by any later run.
    for mark, recorded in checkpoints:
        for t in hub.transfers[mark:]:
            again = {
                i for i in recorded if i * PART < t.start + t.sent and (i + 1) * PART > t.start
            }
            assert not again, f"seed {seed}: recorded parts {sorted(again)} fetched again"
    # Overall: a kill loses what it had in flight and the few finished parts the recorder
    # had not made durable yet (more of those when the machine is loaded).
    twice = hub.sent() - len(BIG)
    assert twice <= kills * (connections + 4) * PART, f"seed {seed}: {twice} bytes twice"
    assert "resuming" in result.stderr


def test_a_partial_whose_commit_changed_starts_over(hub: FakeHub, tmp_path: Path) -> None:
    hub.connection_rate = 1_000_000
    proc = start_fetch(tmp_path, hub.url)
    assert kill_after_parts(proc, tmp_path, 8)
    hub.settle()
    before = hub.sent()
    hub.repos["owner/tiny"].commit = COMMIT_B  # the same bytes, at another commit
    hub.connection_rate = 0
    result = fetch(tmp_path, hub.url)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == BIG
    assert COMMIT_B in result.stdout
    assert hub.sent() - before == len(BIG)  # everything again
    assert "resuming" not in result.stderr


def test_a_corrupt_partial_is_caught_by_the_digest_and_fetched_again(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.connection_rate = 1_000_000
    proc = start_fetch(tmp_path, hub.url)
    assert kill_after_parts(proc, tmp_path, 4)
    partial = next(blob_dir(tmp_path).glob("*.incomplete"))
    with open(partial, "r+b") as handle:  # bit rot in a part the sidecar vouches for
        handle.seek(0)
        handle.write(b"\xff" * 100)
    hub.connection_rate = 0
    result = fetch(tmp_path, hub.url)
    assert result.returncode == 0, result.stderr
    assert "does not match the SHA-256" in result.stderr
    assert Path(result.stdout.strip()).read_bytes() == BIG


def test_a_listing_that_understates_the_size_stops_at_the_listed_size(tmp_path: Path) -> None:
    huge = bytes(64 * 1024 * 1024)
    repo = HubRepo({NAME: huge}, listed_sizes={NAME: 1000})
    for ignore_range in (True, False):
        server = FakeHub({"owner/tiny": repo}, ignore_range=ignore_range).start()
        data = tmp_path / f"ignore-{ignore_range}"
        try:
            result = fetch(data, server.url)
        finally:
            server.stop()
        assert result.returncode == 2, result.stderr
        assert "not the file the Hub lists" in result.stderr and "HF_ENDPOINT" in result.stderr
        assert "Traceback" not in result.stderr
        written = [p.stat().st_size for p in data.rglob("*") if p.is_file()]
        assert max(written, default=0) <= 1000
        assert server.sent() < len(huge) // 2  # the transfer was stopped, not drained


def test_a_hub_that_stops_sending_ends_the_attempt_keeping_the_parts(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.connection_rate = 1_000_000
    proc = start_fetch(tmp_path, hub.url)
    assert kill_after_parts(proc, tmp_path, 4)
    kept = recorded_parts(tmp_path)
    hub.first_byte_delay = 3600  # answers nothing from now on
    result = fetch(tmp_path, hub.url, GATEWAY_DOWNLOAD_STALL_SECONDS="0.5")
    assert result.returncode == 2, result.stderr
    assert "no data for 3s on any connection" in result.stderr
    assert "parts already fetched are kept" in result.stderr
    assert recorded_parts(tmp_path) == kept


def test_download_connections_is_checked(hub: FakeHub, tmp_path: Path) -> None:
    for bad in ("0", "many", "65"):
        result = fetch(tmp_path, hub.url, DOWNLOAD_CONNECTIONS=bad)
        assert result.returncode == 2 and "DOWNLOAD_CONNECTIONS" in result.stderr
    assert hub.transfers == []


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real file system that fills up."""
    mount = tmp_path / "volume"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_exits_2_naming_data_dir_and_keeps_what_it_has(
    small_volume: Path,
) -> None:
    shards = {
        "Big-Q4_K_M-00001-of-00002.gguf": model_bytes(600 * 1024, seed=2),
        "Big-Q4_K_M-00002-of-00002.gguf": model_bytes(600 * 1024, seed=3),
    }
    server = FakeHub({"owner/tiny": HubRepo(dict(shards))}).start()
    try:
        full = fetch(small_volume, server.url)
        assert full.returncode == 2, full.stderr
        assert f"DATA_DIR={small_volume} is full" in full.stderr
        assert "Traceback" not in full.stderr
        first = hashlib.sha256(shards["Big-Q4_K_M-00001-of-00002.gguf"]).hexdigest()
        assert (blob_dir(small_volume) / first).is_file()  # the first shard is kept
        sent = server.sent()
        subprocess.run(["mount", "-o", "remount,size=4m", str(small_volume)], check=True)
        again = fetch(small_volume, server.url)
        assert again.returncode == 0, again.stderr
        assert server.sent() - sent == 600 * 1024  # only the second shard now
    finally:
        server.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate for the https stand-in")
    where = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(where / "key.pem"), "-out", str(where / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return where


def test_an_https_to_http_redirect_never_carries_the_token(
    certificate: Path, tmp_path: Path
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    # The same host and port, https and http: only the scheme tells them apart.
    server = FakeHub({"owner/tiny": HubRepo({NAME: BIG})}, tls=context, downgrade=True).start()
    try:
        result = fetch(
            tmp_path, server.url, HF_TOKEN=TOKEN, SSL_CERT_FILE=str(certificate / "cert.pem")
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == BIG
    api = [h for _, p, h in server.requests if "/api/" in p]
    assert api and all(h.get("Authorization") == f"Bearer {TOKEN}" for h in api)
    redirected = [h for _, p, h in server.requests if "/resolve/" in p]
    assert server.transfers and not any(t.tls for t in server.transfers)
    plain = [t for t in server.transfers]
    assert all(t.authorization is None for t in plain)
    # The https resolve call itself was the Hub's own origin: it carried the token.
    assert any(h.get("Authorization") for h in redirected)
    assert TOKEN not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "url, carries",
    [
        pytest.param("https://huggingface.co/o/r/resolve/c/f.gguf", True, id="same-origin"),
        pytest.param("https://HuggingFace.co:443/o/r", True, id="case-and-default-port"),
        pytest.param("http://huggingface.co/o/r", False, id="https-to-http"),
        pytest.param("https://huggingface.co:8443/o/r", False, id="other-port"),
        pytest.param("https://cdn-lfs.huggingface.co/x", False, id="cdn-host"),
        pytest.param("https://huggingface.co.evil.example/x", False, id="suffix-host"),
    ],
)
def test_the_token_goes_to_the_endpoints_own_origin_only(url: str, carries: bool) -> None:
    assert carries_token("https://huggingface.co", url) is carries


def test_a_disk_filling_up_mid_file_keeps_the_parts_already_recorded(
    small_volume: Path,
) -> None:
    # Room for the data (reserved up front) and one page of sidecar: 1,024 parts of 4 KiB
    # outgrow that page three quarters of the way through, so the disk fills mid-file.
    data = model_bytes(1024 * 4096, seed=4)
    subprocess.run(["mount", "-o", "remount,size=4100k", str(small_volume)], check=True)
    server = FakeHub({"owner/tiny": HubRepo({NAME: data})}).start()
    small = {"GATEWAY_DOWNLOAD_PART_BYTES": "4096"}
    try:
        full = fetch(small_volume, server.url, **small)
        assert full.returncode == 2, full.stderr
        assert f"DATA_DIR={small_volume} is full" in full.stderr
        assert "parts already fetched are kept" in full.stderr and "Traceback" not in full.stderr
        kept = recorded_parts(small_volume)
        assert 0 < kept < 1024
        server.settle()
        sent = server.sent()
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_volume)], check=True)
        again = fetch(small_volume, server.url, **small)
        assert again.returncode == 0, again.stderr
        assert f"resuming {NAME}: {kept} of 1024 parts" in again.stderr
        assert Path(again.stdout.strip()).read_bytes() == data
        server.settle()
        assert server.sent() - sent <= (1024 - kept) * 4096  # only what was not recorded
    finally:
        server.stop()


def test_parts_come_from_the_cdn_without_the_token_and_an_expired_url_is_resolved_again(
    tmp_path: Path,
) -> None:
    files = {"owner/tiny": HubRepo({NAME: BIG}, gated=True)}
    # The first GET at the CDN finds its signed URL expired.
    cdn = FakeHub({"owner/tiny": HubRepo({NAME: BIG})}, expire={0}).start()
    hub = FakeHub(files, redirect_to=cdn.url).start()
    try:
        # One connection, so the Hub's resolve calls can be counted exactly.
        result = fetch(tmp_path, hub.url, HF_TOKEN=TOKEN, DOWNLOAD_CONNECTIONS="1")
        hub.settle()
        cdn.settle()
    finally:
        hub.stop()
        cdn.stop()
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == BIG
    # The Hub (a gated repo) saw the token on every call; the CDN, another origin, never.
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for _, _, h in hub.requests)
    assert cdn.requests and not any("Authorization" in h for _, _, h in cdn.requests)
    assert cdn.sent() == len(BIG) and hub.sent() == 0
    # The expired answer sent the downloader back to the Hub for a fresh redirect.
    resolves = [p for _, p, _ in hub.requests if "/resolve/" in p]
    assert len(resolves) == 2
