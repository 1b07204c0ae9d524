"""What a request body can make llama-server do: slots taken and an upper bound of tokens.

Pure functions over a parsed JSON body, so every rule is tested without a server. A key
holder who has read llama-server's docs can send any field it understands; the plan
follows llama-server's own reading of the body (b11434, server-schema.cpp and
server-chat.cpp), not the OpenAI one:

* length: ``n_predict`` with its aliases ``max_completion_tokens`` then ``max_tokens``,
  the first that is present and not null. /v1/responses moves ``max_output_tokens`` into
  ``max_tokens`` (so ``max_completion_tokens`` still wins over it); /v1/messages passes
  ``max_tokens`` alone, 4096 when the key is absent, and a null one means no limit. -1
  (or no length at all) means "until the slot's context is full"; below -1 llama-server
  refuses the body, and so do we, naming the field;
* tasks: every choice (``n_cmpl``, or its alias ``n``) of every prompt of a batch
  (``prompt`` as a list on completions; ``input``, or ``content`` when there is no
  ``input``, on embeddings; ``documents``, or ``texts``, on rerank) is its own task
  inside llama-server, occupying a slot while it runs. A list holding any integer is one
  prompt of token ids, as llama-server reads it;
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
from .routes import Form

# llama-server's n_predict and its aliases, in its order of precedence.
LENGTH_FIELDS = ("n_predict", "max_completion_tokens", "max_tokens")
# What llama-server generates on /v1/messages when max_tokens is absent.
MESSAGES_DEFAULT_MAX_TOKENS = 4096
# Body formats (routes.py: the route table says which each path has) by how
# llama-server reads them, its native formats beside the OpenAI ones.
EMBEDDING_FORMS = frozenset({Form.EMBED, Form.EMBED_NATIVE})
# Formats whose ``prompt`` may be a batch of prompts.
BATCH_PROMPT_FORMS = frozenset({Form.TEXT, Form.NATIVE})
# Formats that only read their input: no completion tokens.
INPUT_ONLY = EMBEDDING_FORMS | {Form.RERANK, Form.DECISION}
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


def _length(payload: dict[str, Any], name: str) -> int | None:
    """One length field: None for "no limit" (-1), refused below -1 as llama-server does."""
    value = _whole(payload, name)
    if value is not None and value < -1:
        raise bad_request(
            f"'{name}' must be -1 (no limit) or a whole number of tokens from 0", param=name
        )
    return None if value == -1 else value


def _length_fields(form: Form, payload: dict[str, Any]) -> list[tuple[str, Any]]:
    """The length fields llama-server's completion parser sees, in its order, by the
    names the client used."""
    if form is Form.MESSAGES:
        # Rebuilt from a few known fields: max_tokens alone, 4096 when the key is absent
        # (a null one is passed on, and null means llama-server's default: no limit).
        return [("max_tokens", payload.get("max_tokens", MESSAGES_DEFAULT_MAX_TOKENS))]
    last = "max_tokens"
    if form is Form.RESPONSES and "max_output_tokens" in payload:
        # server-chat.cpp copies max_output_tokens over max_tokens, null included;
        # n_predict and max_completion_tokens pass unchanged and still come first.
        last = "max_output_tokens"
    return [(name, payload.get(name)) for name in (*LENGTH_FIELDS[:2], last)]


def completion_cap(form: Form, payload: dict[str, Any]) -> int | None:
    """The completion length llama-server will use, None for "up to the context"."""
    for name, value in _length_fields(form, payload):
        if value is not None:
            return _length({name: value}, name)
    return None


def _batch_size(value: object) -> int:
    """Prompts in a prompt/input field: a list with no integer in it is a batch.

    llama-server reads a list holding any integer as one prompt of token ids (mixed
    with text pieces), and every other list as one prompt per element.
    """
    if isinstance(value, list) and value:
        if any(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return 1
        return len(value)
    return 1


def _string_list(value: object) -> list[Any] | None:
    """A JSON array of strings, as llama-server's json_value reads one (else its default)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def rerank_documents(payload: dict[str, Any]) -> int:
    """Documents llama-server scores: ``documents``, else its TEI alias ``texts``.

    A ``documents`` of the wrong type falls back to ``texts`` there too.
    """
    documents = _string_list(payload.get("documents"))
    if not documents:
        documents = _string_list(payload.get("texts"))
    return len(documents) if documents else 1


def embedding_inputs(payload: dict[str, Any]) -> int:
    """Inputs llama-server embeds: ``input`` when the key is there, else ``content``."""
    return _batch_size(payload["input"] if "input" in payload else payload.get("content"))


def choices(payload: dict[str, Any]) -> int:
    """Completions per prompt: llama-server reads ``n_cmpl``, then its alias ``n``."""
    name = "n_cmpl" if payload.get("n_cmpl") is not None else "n"
    n = _whole(payload, name)
    if n is None:
        return 1
    if not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"'{name}' must be between 1 and {MAX_CHOICES}", param=name)
    return n


def check_rerank(payload: dict[str, Any]) -> None:
    """``top_n`` is read as a C int: a negative one (or one that wraps to negative past
    2**31) makes llama-server resize its results to 2**64 - 1 and fail with a 500."""
    top_n = payload.get("top_n")
    if isinstance(top_n, (int, float)) and not isinstance(top_n, bool):
        if not -1 < top_n < 2**31:
            raise bad_request(f"'top_n' must be between 0 and {2**31 - 1}", param="top_n")


def plan(form: Form, payload: object, body_bytes: int, slot_ctx: int) -> Plan:
    """Slots and an upper bound of tokens for ``payload`` in body format ``form``.

    ``slot_ctx`` is the context of one slot (llama-server's n_ctx per slot).
    """
    if not isinstance(payload, dict):
        # Not JSON (an audio upload): one task, up to the slot's context.
        return Plan(1, min(body_bytes, slot_ctx) if form in INPUT_ONLY else slot_ctx)
    if form in EMBEDDING_FORMS:
        inputs = embedding_inputs(payload)
        tokens = min(body_bytes + _SPECIALS_PER_INPUT * inputs, inputs * slot_ctx)
        return Plan(inputs, tokens)
    if form is Form.RERANK:
        check_rerank(payload)
        inputs = rerank_documents(payload)
        # Each document is scored together with the query: the query counts every time.
        tokens = min(inputs * (body_bytes + _SPECIALS_PER_INPUT), inputs * slot_ctx)
        return Plan(inputs, tokens)
    if form is Form.DECISION:
        # Questions scored over the state given: input only, within one slot's context.
        return Plan(1, min(body_bytes + _SPECIALS_PER_INPUT, slot_ctx))
    if form is Form.MESSAGES:
        # /v1/messages passes neither n nor a batch of prompts to llama-server.
        cap = completion_cap(form, payload)
        return Plan(1, slot_ctx if cap is None else min(slot_ctx, body_bytes + cap))
    tasks = choices(payload)
    if form in BATCH_PROMPT_FORMS:
        tasks *= _batch_size(payload.get("prompt"))
    cap = completion_cap(form, payload)
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
