"""Models from the Hub: scripts/fetch_model.py against a stand-in Hub (no llama-server)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gguf_gateway.hub import HubError, ModelRef, choose, parse_ref, quants_in, unsafe_path
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
    size = len(FILES["Tiny-Q4_K_M.gguf"])
    assert Path(result.stdout.strip()).read_bytes() == FILES["Tiny-Q4_K_M.gguf"]
    ranges = [h.get("Range") for _, p, h in hub.requests if "/resolve/" in p]
    # A small file is one stream; cut half-way, it goes on from where it stopped.
    assert ranges == [f"bytes=0-{size - 1}", f"bytes={size // 2}-{size - 1}"]
    assert hub.sent() == size


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


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


@pytest.mark.parametrize(
    "repo, escape",
    [
        pytest.param(
            HubRepo({"../../../../../escape-Q4_K_M.gguf": b"GGUF"}), "escape", id="dotdot-path"
        ),
        pytest.param(HubRepo({"ABSOLUTE": b"GGUF"}), "abs", id="absolute-path"),
        pytest.param(
            HubRepo({"x\n--tools\nall\n-Q4_K_M.gguf": b"GGUF"}), None, id="newline-in-path"
        ),
        pytest.param(HubRepo({"x\u2028-Q4_K_M.gguf": b"GGUF"}), None, id="line-separator"),
        pytest.param(
            HubRepo({"Tiny-Q4_K_M.gguf": b"GGUF"}, commit="../../../../../escape"),
            "escape",
            id="commit-not-hex",
        ),
        pytest.param(
            HubRepo({"Tiny-Q4_K_M.gguf": b"GGUF"}, oids={"Tiny-Q4_K_M.gguf": "../../../../esc"}),
            "esc",
            id="lfs-oid-not-hex",
        ),
    ],
)
def test_a_hostile_hub_listing_exits_2_and_writes_nothing(
    tmp_path: Path, repo: HubRepo, escape: str | None
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if "ABSOLUTE" in repo.files:
        repo.files = {str(tmp_path / "abs-Q4_K_M.gguf"): b"GGUF"}
    server = FakeHub({"owner/evil": repo}).start()
    try:
        result = fetch(data, server.url, MODEL_REPO="owner/evil")
    finally:
        server.stop()
    assert result.returncode == 2, result.stderr
    assert "HF_ENDPOINT" in result.stderr and "refused" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert files_under(tmp_path) == []  # nothing in the cache, nothing outside it
    if escape is not None:
        assert not list(tmp_path.parent.glob(f"{escape}*"))


@pytest.mark.parametrize(
    "raw, said",
    [
        pytest.param(b"[" * 200_000 + b"]" * 200_000, "nested too deep", id="json-bomb"),
        pytest.param(b"[" + b" " * (33 << 20) + b"]", "more than 32 MiB", id="huge-listing"),
    ],
)
def test_a_hostile_listing_body_exits_2_without_a_traceback(
    tmp_path: Path, raw: bytes, said: str
) -> None:
    server = FakeHub({"owner/evil": HubRepo({"Tiny-Q4_K_M.gguf": b"GGUF"}, raw_tree=raw)}).start()
    try:
        result = fetch(tmp_path, server.url, MODEL_REPO="owner/evil")
    finally:
        server.stop()
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "HF_ENDPOINT" in result.stderr
    assert "Traceback" not in result.stderr and files_under(tmp_path) == []


def test_the_hub_answering_another_commit_for_a_pinned_commit_is_refused(
    hub: FakeHub, tmp_path: Path
) -> None:
    pinned = "f" * 40
    result = fetch(tmp_path, hub.url, MODEL_REPO="owner/tiny", MODEL_REVISION=pinned)
    assert result.returncode == 2 and pinned in result.stderr, result.stderr
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "path, safe",
    [
        ("Tiny-Q4_K_M.gguf", True),
        ("Q2_K/a b-Q2_K-00001-of-00003.gguf", True),
        ("../x.gguf", False),
        ("a/../../x.gguf", False),
        ("/etc/x.gguf", False),
        ("a//x.gguf", False),
        ("./x.gguf", False),
        ("a\\..\\x.gguf", False),
        ("a\nb.gguf", False),
        ("a\rb.gguf", False),
        ("a\x00b.gguf", False),
        ("a\x85b.gguf", False),
        ("", False),
        ("x" * 2000, False),
    ],
)
def test_only_plain_relative_paths_are_joined_onto_the_cache(path: str, safe: bool) -> None:
    assert (unsafe_path(path) is None) == safe


@pytest.mark.parametrize(
    "revision",
    ["/tmp/pwned", "a/../../x", "..", "ma\nin", "a//b", "v 1", "x" * 129, "ref/", "a\x00"],
)
def test_a_model_revision_that_is_not_a_plain_name_exits_2(tmp_path: Path, revision: str) -> None:
    with pytest.raises(HubError, match="MODEL_REVISION"):
        parse_ref({"MODEL_REPO": "o/r", "MODEL_REVISION": revision})


def test_a_model_revision_like_an_absolute_path_writes_nothing_there(
    hub: FakeHub, tmp_path: Path
) -> None:
    target = tmp_path / "outside" / "pwned"
    result = fetch(tmp_path / "data", hub.url, MODEL_REPO="owner/tiny", MODEL_REVISION=str(target))
    assert result.returncode == 2 and "MODEL_REVISION" in result.stderr, result.stderr
    assert not target.exists() and downloads(hub) == []


def test_a_pinned_revision_is_never_replaced_by_another_cached_snapshot(
    hub: FakeHub, tmp_path: Path
) -> None:
    commit = HubRepo({}).commit
    first = fetch(tmp_path, hub.url, MODEL_REPO="owner/tiny")  # main, cached as `commit`
    assert first.returncode == 0, first.stderr
    down = f"http://127.0.0.1:{free_port()}"
    other = fetch(tmp_path, down, MODEL_REPO="owner/tiny", MODEL_REVISION="v2.0")
    assert other.returncode == 2, other.stderr
    assert "MODEL_REVISION=v2.0" in other.stderr and "unreachable" in other.stderr
    assert other.stdout == ""
    # The pin names what is cached: by commit, and by the branch that pointed at it.
    for revision in (commit, "main"):
        same = fetch(tmp_path, down, MODEL_REPO="owner/tiny", MODEL_REVISION=revision)
        assert same.returncode == 0 and same.stdout == first.stdout, same.stderr
    # Unpinned, a start with the Hub down still takes any complete snapshot.
    (tmp_path / "huggingface" / "hub" / "models--owner--tiny" / "refs" / "main").unlink()
    loose = fetch(tmp_path, down, MODEL_REPO="owner/tiny")
    assert loose.returncode == 0 and loose.stdout == first.stdout, loose.stderr


def test_a_pinned_revision_online_is_the_commit_the_hub_names(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["owner/tiny"].commit = "ab" * 20
    result = fetch(tmp_path, hub.url, MODEL_REPO="owner/tiny", MODEL_REVISION="release/v1")
    assert result.returncode == 0, result.stderr
    assert f"/snapshots/{'ab' * 20}/" in result.stdout
    refs = tmp_path / "huggingface" / "hub" / "models--owner--tiny" / "refs" / "release" / "v1"
    assert refs.read_text() == "ab" * 20
