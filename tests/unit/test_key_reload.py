"""KeySource's reloads when the key file is missing or unreadable: the last good keys stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gguf_gateway.keys import KeySource


def later(path: Path) -> None:
    """Move the file's mtime on, so the once-a-second check sees a change."""
    future = time.time_ns() + 10**9
    os.utime(path, ns=(future, future))


@pytest.mark.parametrize("breakage", ["missing", "a-directory", "not-utf8"])
def test_a_broken_key_file_keeps_the_last_good_keys(tmp_path: Path, breakage: str) -> None:
    path = tmp_path / "keys"
    path.write_text("a:sk-one-000\nb:sk-two-000\n")
    warnings: list[str] = []
    source = KeySource(path, log=warnings.append)
    assert source.current(now=0).match("sk-one-000")
    path.unlink()
    if breakage == "a-directory":
        path.mkdir()
        later(path)
    elif breakage == "not-utf8":
        path.write_bytes(b"a:sk-one-000\n\xff\n")
        later(path)
    source.reload()  # SIGHUP
    ring = source.current(now=5)  # and the mtime check
    assert ring.match("sk-one-000") and ring.match("sk-two-000") and len(ring) == 2
    assert any("keeping the last good keys (2 key(s))" in w for w in warnings), warnings
    assert not any("sk-one-000" in w for w in warnings)
    # A good file again is read again.
    if path.is_dir():
        path.rmdir()
    path.write_text("c:sk-three-00\n")
    later(path)
    source.reload()
    assert source.ring.match("sk-three-00") and not source.ring.match("sk-one-000")


def test_an_empty_key_file_is_how_every_key_is_revoked(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("a:sk-one-000\n")
    source = KeySource(path)
    path.write_text("")
    source.reload()
    assert len(source.ring) == 0


def test_no_key_file_at_start_means_only_the_single_key(tmp_path: Path) -> None:
    source = KeySource(tmp_path / "absent", api_key="sk-single-00")
    single = source.ring.match("sk-single-00")
    assert len(source.ring) == 1 and single is not None and single.key_id == "default"
