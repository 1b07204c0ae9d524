"""The cold-start timeline: the supervisor's events and the gateway's ready moment."""

from __future__ import annotations

import pytest

from gguf_gateway import startup

FILE = "boot=100.0\ndownload_start=101.5\ndownload_end=131.5\nload_start=131.6\n"


def test_the_file_is_read_leniently() -> None:
    text = FILE + "junk\nload_start=oops\nmystery=5\nboot=99,5\n"
    assert startup.parse(text) == {
        "boot": 99.5,  # the last one wins, with a decimal comma from another locale
        "download_start": 101.5,
        "download_end": 131.5,
        "load_start": 131.6,
    }


@pytest.mark.parametrize(
    "text, ready_at, now, expected",
    [
        pytest.param(
            "boot=100\n",
            None,
            100.4,
            {"phase": "starting", "download_seconds": None, "load_seconds": None},
            id="starting",
        ),
        pytest.param(
            "boot=100\ndownload_start=101\n",
            None,
            111.0,
            {"phase": "downloading", "download_seconds": 10.0, "load_seconds": None},
            id="downloading-counts-up",
        ),
        pytest.param(
            FILE,
            None,
            135.0,
            {"phase": "loading", "download_seconds": 30.0, "load_seconds": 3.4},
            id="loading",
        ),
        pytest.param(
            FILE,
            140.0,
            500.0,
            {
                "phase": "ready",
                "download_seconds": 30.0,
                "load_seconds": 8.4,
                "ready_seconds": 40.0,
            },
            id="ready",
        ),
        pytest.param(
            "boot=100\nload_start=100.5\n",
            102.0,
            103.0,
            {"phase": "ready", "download_seconds": None, "load_seconds": 1.5, "ready_seconds": 2.0},
            id="no-download",
        ),
    ],
)
def test_phases(text: str, ready_at: float | None, now: float, expected: dict[str, object]) -> None:
    got = startup.timeline(startup.parse(text), ready_at, now)
    assert {k: got[k] for k in expected} == expected


def test_only_finished_phases_are_exported() -> None:
    events = startup.parse(FILE)
    assert startup.finished(events, None) == {"download": 30.0}
    assert startup.finished(events, 140.0) == {"download": 30.0, "load": 8.4, "ready": 40.0}
