"""llama-server's web UI through the gateway: which paths are its static files.

The UI is a static single-page app: ``/`` (its ``index.html``), hashed bundles under
``/_app/``, and icons, the PWA manifest, ``sw.js``, ``build.json`` and the like. They hold no secret, so they need no key: a person opens the page first
and types a key into the UI's own prompt, which appears on the 401 from ``/props``.
Everything the UI then calls is an API route and needs a key as usual.

These paths are a class of their own in the route table, recognised by shape rather
than listed one by one, since each UI build names its bundles differently. The shape
excludes every API path: API routes have no file extension and none lives under
``/_app/``. llama-server is asked for them with the backend key: with ``--path`` and
``--api-key`` together it wants a key for every static file but ``/``.

Only the response headers that matter to a browser's cache and loader come back
(``STATIC_HEADERS``); the body is relayed byte for byte, never recompressed.
"""

from __future__ import annotations

import re

from .routes import Kind, Route

# One path segment: no leading dot (so no "..", no dotfiles), a conservative alphabet.
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._@+~-]*"
# Anything under /_app/ (the hashed bundles); elsewhere a file with an extension a web
# page loads (icons, manifest, sw.js, recommended-mcp/*.png).
_UI_PATH = re.compile(
    rf"/(?:_app(?:/{_SEGMENT})+|(?:{_SEGMENT}/)*{_SEGMENT}\."
    r"(?:html|js|mjs|css|json|webmanifest|ico|png|svg|jpg|jpeg|gif|webp|avif|txt|xml"
    r"|woff2?|ttf|wasm|map))"
)

UI_ROUTE = Route("/", frozenset({"GET", "HEAD"}), Kind.STATIC, None)

# Response headers a browser needs from a static file: its type and coding, validators
# and caching policy (ETag/304 keeps reloads cheap), and the cross-origin isolation
# headers llama-server sets on index.html. Nothing else of llama-server's head is copied.
STATIC_HEADERS = (
    "content-type",
    "content-encoding",
    "etag",
    "last-modified",
    "cache-control",
    "expires",
    "vary",
    "location",
    "cross-origin-embedder-policy",
    "cross-origin-opener-policy",
    "cross-origin-resource-policy",
)

# Request headers llama-server acts on for a static file (gzip choice, revalidation).
FORWARDED_REQUEST_HEADERS = ("accept-encoding", "if-none-match", "if-modified-since")


def is_ui_path(path: str) -> bool:
    """``/`` or a path shaped like one of the UI's static files."""
    return path == "/" or _UI_PATH.fullmatch(path) is not None
