"""OpenAI-shaped error bodies, in one place.

``{"error": {"message", "type", "code", "param"}}`` is what the OpenAI SDKs parse into
their exception classes; the ``type`` names follow llama-server's own, so a client sees
one vocabulary whether the gateway or the backend refused it.
"""

from __future__ import annotations

import json

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    417: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "not_supported_error",
    502: "server_error",
    503: "unavailable_error",
    504: "timeout_error",
    505: "not_supported_error",
}

_CODES = {
    401: "invalid_api_key",
    403: "insufficient_scope",
    404: "not_found",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


def error_payload(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "code": code or _CODES.get(status, str(status)),
            "param": param,
        }
    }


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> bytes:
    return json.dumps(error_payload(status, message, code, param)).encode()


def sse_error_event(status: int, message: str, code: str | None = None) -> bytes:
    """An SSE ``error`` event; the OpenAI SDKs raise APIError when they read it."""
    body = json.dumps(error_payload(status, message, code))
    return f"event: error\ndata: {body}\n\n".encode()
