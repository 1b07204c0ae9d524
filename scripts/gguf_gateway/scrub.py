"""Filesystem paths out of the replies an inference key reads (/props, /models, /lora-adapters).

llama-server tells its clients where its files are: ``model_path`` in ``/props``, each
adapter's ``path``, and in router mode each model's command line (``status.args``) and
preset. A key holder has no business with the container's layout: a path becomes its
file name, and the command line and preset (paths and settings throughout) are dropped.
Model ids are left alone: the supervisor names the model (``--alias``), so they are
never paths, and clients send them back.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

# Values that are whole command lines or config files: no part of them is for clients.
_DROPPED = frozenset({"args", "preset"})


def _is_path_key(name: str) -> bool:
    return name == "path" or name.endswith("_path") or name in ("file", "model_file")


def _reduced(name: str, value: str) -> str:
    if "/" in value and _is_path_key(name):
        return PurePosixPath(value).name
    return value


def _scrubbed(value: Any) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for name, item in value.items():
            if name in _DROPPED:
                continue
            if isinstance(item, str):
                out[name] = _reduced(name, item)
            else:
                out[name] = _scrubbed(item)
        return out
    if isinstance(value, list):
        return [_scrubbed(item) for item in value]
    return value


def scrub_paths(body: bytes) -> bytes:
    """The reply with every path reduced to a file name (an unreadable one: unchanged)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    return json.dumps(_scrubbed(payload), ensure_ascii=False, separators=(",", ":")).encode()
