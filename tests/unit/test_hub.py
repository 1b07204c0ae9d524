"""Models from the Hub: scripts/fetch_model.py against a stand-in Hub (no llama-server)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gguf_gateway.hub import HubError, ModelRef, choose, parse_ref, quants_in
from support.fake_hub import FakeHub, HubRepo
from support.procs import ROOT, free_port

TOKEN = "hf_test_token_with_access"
FILES = {
    "Tiny-Q4_K_M.gguf": b"GGUF" + os.urandom(300_000),
    "Tiny-Q8_0-00001-of-00002.gguf": b"GGUF" + os.urandom(200_000),
    "Tiny-Q8_0-00002-of-00002.gguf": os.urandom(200_000),
    "mmproj-Tiny-f16.gguf": b"GGUF" + os.urandom(1000),
    "README.md": b"# tiny",
}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub(
        {"owner/tiny": HubRepo(dict(FILES)), "owner/gated": HubRepo(dict(FILES), gated=True)}
    ).start()
    try:
        yield server
    finally:
        server.stop()


def fetch(data_dir: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ["PATH"], "DATA_DIR": str(data_dir), "HF_ENDPOINT": endpoint}
    full.update(env)
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_model.py")],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def downloads(hub: FakeHub) -> list[str]:
    return [path for method, path, _ in hub.requests if "/resolve/" in path and method == "GET"]


def test_first_start_fetches_only_the_chosen_quant_into_the_hub_cache_layout(
    hub: FakeHub, tmp_path: Path
) -> None:
    result = fetch(tmp_path, hub.url, MODEL_REPO="owner/tiny:q8_0")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    root = tmp_path / "huggingface" / "hub" / "models--owner--tiny"
    commit = HubRepo({}).commit
    assert path == root / "snapshots" / commit / "Tiny-Q8_0-00001-of-00002.gguf"
    assert (root / "refs" / "main").read_text() == commit
    for name in ("Tiny-Q8_0-00001-of-00002.gguf", "Tiny-Q8_0-00002-of-00002.gguf"):
        link = root / "snapshots" / commit / name
        assert link.is_symlink() and link.read_bytes() == FILES[name]
        assert link.resolve().parent == (root / "blobs").resolve()
    assert sorted(p.rsplit("/", 1)[1] for p in downloads(hub)) == [
        "Tiny-Q8_0-00001-of-00002.gguf",
        "Tiny-Q8_0-00002-of-00002.gguf",
    ]
    assert "%" in result.stderr and "MB/s" in result.stderr


def test_a_cut_transfer_resumes_with_a_range_request(hub: FakeHub, tmp_path: Path) -> None:
    hub.cut_first_transfer = True
    result = fetch(tmp_path, hub.url, MODEL_REPO="owner/tiny")  # Q4_K_M by default
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == FILES["Tiny-Q4_K_M.gguf"]
    ranges = [h.get("Range") for _, p, h in hub.requests if "/resolve/" in p]
    assert ranges[0] is None and ranges[1] == f"bytes={(len(FILES['Tiny-Q4_K_M.gguf'])) // 2}-"
    assert "resuming" in result.stderr


def test_a_later_start_with_the_hub_down_serves_from_the_volume(
    hub: FakeHub, tmp_path: Path
) -> None:
    first = fetch(tmp_path, hub.url, MODEL_REPO="owner/tiny:Q4_K_M")
    assert first.returncode == 0, first.stderr
    down = f"http://127.0.0.1:{free_port()}"
    again = fetch(tmp_path, down, MODEL_REPO="owner/tiny:Q4_K_M")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and "unreachable" in again.stderr


def test_the_hub_down_and_nothing_cached_exits_2_naming_hf_endpoint(tmp_path: Path) -> None:
    result = fetch(tmp_path, f"http://127.0.0.1:{free_port()}", MODEL_REPO="owner/tiny")
    assert result.returncode == 2 and "HF_ENDPOINT" in result.stderr


def test_a_shard_the_repo_lacks_exits_2_naming_it(tmp_path: Path) -> None:
    first = {"Big-Q4_K_M-00001-of-00002.gguf": b"GGUF" + os.urandom(1000)}
    server = FakeHub({"owner/big": HubRepo(first)}).start()
    try:
        result = fetch(tmp_path, server.url, MODEL_REPO="owner/big")
    finally:
        server.stop()
    assert result.returncode == 2, result.stderr
    assert "Big-Q4_K_M-00002-of-00002.gguf is not in MODEL_REPO=owner/big" in result.stderr
    assert "Traceback" not in result.stderr


def test_gated_repo_needs_a_token_that_is_never_shown(hub: FakeHub, tmp_path: Path) -> None:
    without = fetch(tmp_path, hub.url, MODEL_REPO="owner/gated")
    assert without.returncode == 2 and "HF_TOKEN" in without.stderr
    wrong = fetch(tmp_path, hub.url, MODEL_REPO="owner/gated", HF_TOKEN="hf_wrong_secret_1")
    assert wrong.returncode == 2 and "HF_TOKEN is not accepted" in wrong.stderr
    assert "hf_wrong_secret_1" not in wrong.stderr + wrong.stdout
    right = fetch(tmp_path, hub.url, MODEL_REPO="owner/gated", HF_TOKEN=TOKEN)
    assert right.returncode == 0, right.stderr
    assert TOKEN not in right.stderr + right.stdout


def test_a_missing_quant_exits_2_listing_the_quants_the_repo_has(
    hub: FakeHub, tmp_path: Path
) -> None:
    result = fetch(tmp_path, hub.url, MODEL_REPO="owner/tiny:IQ2_XXS")
    assert result.returncode == 2
    assert "IQ2_XXS" in result.stderr and "Q4_K_M, Q8_0" in result.stderr


def test_a_hub_endpoint_that_is_not_http_exits_2(tmp_path: Path) -> None:
    result = fetch(tmp_path, "file:///etc", MODEL_REPO="owner/tiny")
    assert result.returncode == 2 and "HF_ENDPOINT" in result.stderr


def test_an_unknown_repo_exits_2(hub: FakeHub, tmp_path: Path) -> None:
    result = fetch(tmp_path, hub.url, MODEL_REPO="owner/nope")
    assert result.returncode == 2 and "MODEL_REPO=owner/nope" in result.stderr
    bad = fetch(tmp_path, hub.url, MODEL_REPO="not a repo")
    assert bad.returncode == 2 and "MODEL_REPO" in bad.stderr


def test_a_model_runpod_cached_is_used_without_asking_the_hub(hub: FakeHub, tmp_path: Path) -> None:
    snapshot = tmp_path / "huggingface-cache" / "hub" / "models--owner--tiny" / "snapshots" / "c1"
    snapshot.mkdir(parents=True)
    for name, data in FILES.items():
        (snapshot / name).write_bytes(data)
    result = fetch(tmp_path, hub.url, MODEL_REPO="owner/tiny:Q8_0")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot / "Tiny-Q8_0-00001-of-00002.gguf"
    assert hub.requests == []


def test_a_corrupt_partial_download_is_fetched_again(hub: FakeHub, tmp_path: Path) -> None:
    repo = hub.repos["owner/tiny"]
    good = repo.files["Tiny-Q4_K_M.gguf"]
    tree_sha = hashlib.sha256(good).hexdigest()
    blob_dir = tmp_path / "huggingface" / "hub" / "models--owner--tiny" / "blobs"
    blob_dir.mkdir(parents=True)
    # A partial file that is not a prefix of the real one: resumed, it cannot match.
    (blob_dir / f"{tree_sha}.incomplete").write_bytes(b"X" * 1000)
    result = fetch(tmp_path, hub.url, MODEL_REPO="owner/tiny")
    assert result.returncode == 0, result.stderr
    assert "SHA-256" in result.stderr and (blob_dir / tree_sha).read_bytes() == good


@pytest.mark.parametrize(
    "ref, names, expected",
    [
        (
            ModelRef("o/r", "q4_k_m", None, "main"),
            ["a-Q4_K_M.gguf", "a-Q8_0.gguf"],
            ["a-Q4_K_M.gguf"],
        ),
        (ModelRef("o/r", None, None, "main"), ["a-F16.gguf", "mmproj-a.gguf"], ["a-F16.gguf"]),
        (ModelRef("o/r", None, "sub/x.gguf", "main"), ["sub/x.gguf"], ["sub/x.gguf"]),
        (
            ModelRef("o/r", "Q2_K", None, "main"),
            ["Q2_K/a-Q2_K-00001-of-00003.gguf"],
            [f"Q2_K/a-Q2_K-0000{i}-of-00003.gguf" for i in (1, 2, 3)],
        ),
    ],
)
def test_choosing_the_files_of_a_quant(
    ref: ModelRef, names: list[str], expected: list[str]
) -> None:
    assert choose(ref, names) == expected


def test_model_repo_settings_are_checked() -> None:
    assert parse_ref({"MODEL_REPO": "o/r:Q8_0"}) == ModelRef("o/r", "Q8_0", None, "main")
    for env in (
        {"MODEL_REPO": "o/r/x"},
        {"MODEL_REPO": "o/r", "MODEL_REPO_FILE": "../x.gguf"},
        {"MODEL_REPO": "o/r", "MODEL_REVISION": "../main"},
    ):
        with pytest.raises(HubError):
            parse_ref(env)
    assert quants_in(["x-IQ3_XXS.gguf", "x-bf16.gguf", "x-Q5_K_S-00001-of-00002.gguf"]) == [
        "BF16",
        "IQ3_XXS",
        "Q5_K_S",
    ]
