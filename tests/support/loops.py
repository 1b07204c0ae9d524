"""Running one test body on each event loop the gateway supports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

LOOPS = [pytest.param("asyncio", id="asyncio"), pytest.param("uvloop", id="uvloop")]


def run(loop_name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``body()`` on asyncio's loop or on uvloop's (skipped where uvloop is missing)."""
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        asyncio.Runner(loop_factory=uvloop.new_event_loop).run(body())
    else:
        asyncio.run(body())
