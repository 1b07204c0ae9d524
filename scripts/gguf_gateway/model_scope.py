"""Which models a request names, and model listings cut to what a key may use.

A key line's ``models=`` limits the key to those model ids. In router mode llama-server
picks (and loads, unless told not to) the model a request names: in a JSON body's
``model`` field, or in the ``model`` query parameter of a GET (``/props?model=...``). Both
are read here, so a key can name no model outside its list in either place.

A listing (``/v1/models``, and in router mode ``/models``) keeps only the entries whose id
or one of whose aliases the key may use; llama-server's single-model ``/v1/models`` also
has a native ``models`` array, filtered the same way. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Collection

# The entry fields that name a model: OpenAI's id, llama-server's native name and model.
_NAMES = ("id", "name", "model")


def query_models(query: str) -> list[str]:
    """Every ``model`` parameter in a query string (llama-server reads the first)."""
    if "model" not in query:
        return []
    return urllib.parse.parse_qs(query, keep_blank_values=True).get("model", [])


def _entry_names(entry: object) -> list[str]:
    if not isinstance(entry, dict):
        return []
    names = [entry[field] for field in _NAMES if isinstance(entry.get(field), str)]
    aliases = entry.get("aliases")
    if isinstance(aliases, list):
        names += [a for a in aliases if isinstance(a, str)]
    return names


def filter_listing(body: bytes, allowed: Collection[str]) -> bytes:
    """A model listing with only the entries a key may use; other bodies pass unchanged."""
    try:
        listing = json.loads(body)
    except ValueError:
        return body
    if not isinstance(listing, dict):
        return body
    changed = False
    for field in ("data", "models"):
        entries = listing.get(field)
        if isinstance(entries, list):
            listing[field] = [e for e in entries if any(n in allowed for n in _entry_names(e))]
            changed = True
    return json.dumps(listing).encode() if changed else body
