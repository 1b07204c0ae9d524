"""What one key starts, only that key can find, replay, stop or steer.

llama-server keeps state that outlives a request and is named by the client:

* resumable streams: a generation sent with ``X-Conversation-Id`` is buffered under that
  id and can be replayed (``GET /v1/stream?conv_id=``), stopped (``DELETE /v1/stream``)
  and found (``POST /v1/streams/lookup``) by anyone who names the id;
* running completions: ``POST /v1/chat/completions/control`` steers the completion whose
  id (``chatcmpl-...``, from its reply) it names.

Every conversation id is namespaced per key on its way to llama-server (a prefix derived
from the key id) and restored on the way back, so two keys naming the same id name two
different streams, and no key can name another's. Completion ids are chosen by
llama-server, so the gateway remembers which key each armed one (``reasoning_control``)
was handed to, and answers a control naming another key's as llama-server answers for an
id it does not know.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .refusals import bad_request

# Conversation ids a client may send: what llama.cpp's web UI makes (uuids, with
# "::<model>" per model variant; a model name can hold "/"), bounded and printable.
_CONV_ID = re.compile(r"[\x21-\x7e]{1,256}")
_SEP = "."
# A completion id in the first events of a chat or text stream.
_CMPL_ID = re.compile(rb'"id":"(chatcmpl-[A-Za-z0-9]{1,64})"')
MAX_REMEMBERED = 4096
# Looks at a stream's reads until it returns True.
Watch = Callable[[bytes], bool]


def namespace(key_id: str) -> str:
    """The prefix of a key's conversation ids: fixed length, so no id can reach another's."""
    return "k" + hashlib.sha256(key_id.encode()).hexdigest()[:24] + _SEP


def conversation_id(key_id: str, raw: str, field: str = "X-Conversation-Id") -> str:
    """A client's conversation id as llama-server will know it."""
    if not _CONV_ID.fullmatch(raw):
        raise bad_request(
            f"{field} must be 1 to 256 printable ASCII characters without spaces",
            "conversation_id",
            param=field,
        )
    return namespace(key_id) + raw


def lookup_body(key_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/streams/lookup``: the ids asked about, in the key's namespace."""
    ids = payload.get("conversation_ids")
    if not isinstance(ids, list):
        raise bad_request(
            "'conversation_ids' must be a list of strings", "body", param="conversation_ids"
        )
    return {
        **payload,
        "conversation_ids": [
            conversation_id(key_id, v, "conversation_ids") for v in ids if isinstance(v, str) and v
        ],
    }


def lookup_reply(key_id: str) -> Callable[[bytes], bytes]:
    """The lookup's answer as the key sees it: its own sessions, under its own ids."""
    prefix = namespace(key_id)

    def restore(body: bytes) -> bytes:
        try:
            sessions = json.loads(body)
        except ValueError:
            return b"[]"
        mine = []
        for session in sessions if isinstance(sessions, list) else ():
            conv = session.get("conversation_id") if isinstance(session, dict) else None
            if isinstance(conv, str) and conv.startswith(prefix):
                mine.append({**session, "conversation_id": conv[len(prefix) :]})
        return json.dumps(mine).encode()

    return restore


class Completions:
    """Which key each armed completion id was handed to (the most recent MAX_REMEMBERED)."""

    def __init__(self) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()

    def remember(self, cmpl_id: str, key_id: str) -> None:
        self._owners[cmpl_id] = key_id
        self._owners.move_to_end(cmpl_id)
        while len(self._owners) > MAX_REMEMBERED:
            self._owners.popitem(last=False)

    def owner(self, cmpl_id: str) -> str | None:
        return self._owners.get(cmpl_id)

    def watcher(self, key_id: str) -> Watch:
        """A callback for a stream's first reads: True once it has seen the id."""

        def watch(data: bytes) -> bool:
            found = _CMPL_ID.search(data)
            if found is None:
                return False
            self.remember(found.group(1).decode(), key_id)
            return True

        return watch


# Sent instead of another key's completion id: llama-server never makes an id like it, so
# the control is answered exactly as for an id that does not exist.
NOBODYS_COMPLETION = "chatcmpl-none"


def control_body(completions: Completions, key_id: str, payload: dict[str, Any]) -> bool:
    """Point a control naming another key's completion at none; True when changed."""
    cmpl_id = payload.get("id")
    if isinstance(cmpl_id, str) and cmpl_id and completions.owner(cmpl_id) != key_id:
        payload["id"] = NOBODYS_COMPLETION
        return True
    return False
