"""What a request body can make llama-server do: slots taken and an upper bound of tokens.

Pure functions over a parsed JSON body, so every rule is tested without a server. A key
holder who has read llama-server's docs can send any field it understands; the plan
follows llama-server's own reading of the body, not the OpenAI one:

* length: ``n_predict`` wins over ``max_completion_tokens``, which wins over
  ``max_tokens`` (``max_output_tokens`` replaces it on /v1/responses; /v1/messages reads
  ``max_tokens`` only, 4096 when absent). None, or a negative value, means "until the
  slot's context is full";
* tasks: every choice (``n_cmpl``, or its alias ``n``) of every prompt of a batch (``prompt`` as a list on
  /v1/completions, ``input`` on /v1/embeddings, ``documents`` on /v1/rerank) is its own
  task inside llama-server, occupying a slot while it runs;
* a task never holds more than the slot's context (prompt and completion together), and
  its prompt never has more tokens than the body has bytes (every tokenizer llama.cpp
  runs emits at least one byte per token).

A wrongly typed length or ``n`` is refused here, naming the field, rather than guessed
at: llama-server would silently fall back to its default for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .refusals import bad_request

# Length fields in llama-server's order of precedence, per route.
LENGTH_FIELDS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("n_predict", "max_completion_tokens", "max_tokens"),
    "/v1/completions": ("n_predict", "max_completion_tokens", "max_tokens"),
    "/v1/responses": ("n_predict", "max_output_tokens", "max_completion_tokens", "max_tokens"),
    # Anthropic-style bodies are rebuilt by llama-server from a few known fields only.
    "/v1/messages": ("max_tokens",),
}
# What llama-server generates on /v1/messages when max_tokens is absent.
MESSAGES_DEFAULT_MAX_TOKENS = 4096
# Routes that only read their input: no completion tokens.
INPUT_ONLY = frozenset({"/v1/embeddings", "/v1/rerank"})
# Fields that would let a client steer llama-server's scheduling: dropped from bodies.
SERVER_ONLY_FIELDS = ("id_slot",)
MAX_CHOICES = 128
# Special tokens llama-server may add around each input of a batch (BOS, EOS, SEP).
_SPECIALS_PER_INPUT = 4


@dataclass(frozen=True, slots=True)
class Plan:
    """What one request may cost: ``tasks`` slots and at most ``tokens`` tokens."""

    tasks: int
    tokens: int


def _whole(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    # JSON true is a number to llama-server's JSON library; to a client it is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad_request(f"'{name}' must be a whole number", param=name)
    return value


def completion_cap(path: str, payload: dict[str, Any]) -> int | None:
    """The completion length llama-server will use, None for "up to the context"."""
    for name in LENGTH_FIELDS.get(path, ()):
        value = _whole(payload, name)
        if value is not None:
            return value if value >= 0 else None
    return None


def _batch_size(value: object) -> int:
    """Prompts in a prompt/input field: a list of strings or of token lists is a batch."""
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return len(value)
    return 1


def choices(payload: dict[str, Any]) -> int:
    """Completions per prompt: llama-server reads ``n_cmpl``, then its alias ``n``."""
    name = "n_cmpl" if payload.get("n_cmpl") is not None else "n"
    n = _whole(payload, name)
    if n is None:
        return 1
    if not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"'{name}' must be between 1 and {MAX_CHOICES}", param=name)
    return n


def plan(path: str, payload: object, body_bytes: int, slot_ctx: int) -> Plan:
    """Slots and an upper bound of tokens for ``payload`` on ``path``.

    ``slot_ctx`` is the context of one slot (llama-server's n_ctx per slot).
    """
    if not isinstance(payload, dict):
        return Plan(1, min(body_bytes, slot_ctx) if path in INPUT_ONLY else slot_ctx)
    if path == "/v1/embeddings":
        inputs = _batch_size(payload.get("input"))
        tokens = min(body_bytes + _SPECIALS_PER_INPUT * inputs, inputs * slot_ctx)
        return Plan(inputs, tokens)
    if path == "/v1/rerank":
        documents = payload.get("documents")
        inputs = len(documents) if isinstance(documents, list) and documents else 1
        # Each document is scored together with the query: the query counts every time.
        tokens = min(inputs * (body_bytes + _SPECIALS_PER_INPUT), inputs * slot_ctx)
        return Plan(inputs, tokens)
    if path == "/v1/messages":
        cap = completion_cap(path, payload)
        if cap is None:
            cap = MESSAGES_DEFAULT_MAX_TOKENS
        return Plan(1, min(slot_ctx, body_bytes + cap))
    tasks = choices(payload)
    if path == "/v1/completions":
        tasks *= _batch_size(payload.get("prompt"))
    cap = completion_cap(path, payload)
    per_task = slot_ctx if cap is None else min(slot_ctx, body_bytes + cap)
    return Plan(tasks, tasks * per_task)


def strip_server_fields(payload: dict[str, Any]) -> bool:
    """Drop fields only the operator may set; True when the body changed."""
    changed = False
    for name in SERVER_ONLY_FIELDS:
        if name in payload:
            del payload[name]
            changed = True
    return changed
