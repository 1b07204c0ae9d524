"""Bounds on grammars, schemas and logprobs: what llama-server's recursive parsers and its
per-token alternatives may be sent, on every body shape that carries them."""

from __future__ import annotations

from typing import Any

import pytest

from gguf_gateway import bodies, grammars
from gguf_gateway.refusals import Refusal

# llama.cpp's own grammars/json.gbnf (MIT): string literals and character classes full of
# quotes, brackets and escapes, comments, repetitions.
JSON_GBNF = r"""root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""

DEEP = "(" * (grammars.MAX_NESTING + 1) + '"a"' + ")" * (grammars.MAX_NESTING + 1)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+( [A-Z][a-z]+)*$"}},
    "required": ["name"],
}


def refusal(payload: dict[str, Any]) -> Refusal:
    with pytest.raises(Refusal) as caught:
        bodies.inspect(payload, allow_remote_media=False)
    assert caught.value.status == 400
    return caught.value


def test_the_grammar_that_crashed_llama_server_is_refused_naming_the_field() -> None:
    payload = {"prompt": "x", "grammar": "root ::= " + "(" * 30000 + '"a"' + ")" * 30000}
    assert len(payload["grammar"]) > 60000
    found = refusal(payload)
    assert found.param == "grammar" and "nests deeper than" in found.message


@pytest.mark.parametrize(
    "grammar",
    [
        pytest.param(JSON_GBNF, id="llama.cpp-json.gbnf"),
        pytest.param(
            'root ::= "' + "(" * 500 + '" [()()()] # ((((((\n', id="parentheses-in-literals"
        ),
        pytest.param(
            "root ::= " + "(" * grammars.MAX_NESTING + '"a"' + ")" * grammars.MAX_NESTING,
            id="at-the-depth-limit",
        ),
        pytest.param(
            # 800,000 symbols unrolled: 0.2 s and 73 MiB in llama-server.
            "root ::= " + '"a"{0,2000} ' * 100,
            id="repetitions-within-the-budget",
        ),
        pytest.param('ws ::= [ \t\n]{0,20}\nroot ::= [0-9]{1,16} ("," ws)* ws', id="counts"),
    ],
)
def test_real_grammars_pass(grammar: str) -> None:
    bodies.inspect({"prompt": "x", "grammar": grammar}, allow_remote_media=False)


@pytest.mark.parametrize(
    "grammar, fragment",
    [
        pytest.param("root ::= " + DEEP, "nests deeper", id="nested-groups"),
        pytest.param(
            "".join(f"r{i} ::= r{i + 1}\n" for i in range(grammars.MAX_GRAMMAR_RULES))
            + f'r{grammars.MAX_GRAMMAR_RULES} ::= "a"\n',
            "rules",
            id="chain-of-rules",
        ),
        pytest.param(
            'root ::= "' + "a" * grammars.MAX_GRAMMAR_BYTES + '"', "larger", id="too-large"
        ),
        pytest.param(
            # 12 KB, one rule: 8 million symbols, 8 s and 486 MiB of llama-server.
            "root ::= " + '"a"{0,2000} ' * 1000,
            "unrolls",
            id="many-repetitions",
        ),
        pytest.param('root ::= "' + "b" * 600 + '"{2000}', "unrolls", id="long-literal-repeated"),
        pytest.param('root ::= "a"{' + "9" * 5000 + "}", "unrolls", id="huge-count"),
    ],
)
def test_grammars_past_the_bounds_are_refused(grammar: str, fragment: str) -> None:
    found = refusal({"prompt": "x", "grammar": grammar})
    assert found.param == "grammar" and fragment in found.message


def nested_pattern(depth: int) -> str:
    return "(" * depth + "a" + ")" * depth


OPEN_LONG_NAME = {
    "type": "object",
    "properties": {"k" * (grammars.MAX_NESTING + 1): {"type": "string"}},
    "additionalProperties": True,
}
MANY_PROPERTIES = {
    "type": "object",
    "properties": {f"p{i}": {"type": "string"} for i in range(grammars.MAX_PROPERTIES + 1)},
}


@pytest.mark.parametrize(
    "payload, param",
    [
        pytest.param({"json_schema": OPEN_LONG_NAME}, "json_schema", id="native-json_schema"),
        pytest.param(
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": OPEN_LONG_NAME},
            }}}},
            "response_format.json_schema.schema",
            id="openai-response_format-nested",
        ),
        pytest.param(
            {"response_format": {"type": "json_object", "schema": MANY_PROPERTIES}},
            "response_format.schema",
            id="llama-response_format-schema",
        ),
        pytest.param(
            {"text": {"format": {"type": "json_schema", "schema": OPEN_LONG_NAME}}},
            "text.format.schema",
            id="responses-text-format",
        ),
        pytest.param(
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": MANY_PROPERTIES}}]},
            "tools",
            id="chat-tool-too-many-properties",
        ),
        pytest.param(
            {"tools": [{"type": "function", "name": "f", "parameters": OPEN_LONG_NAME}]},
            "tools",
            id="responses-tool-long-open-property",
        ),
        pytest.param(
            {"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {
                "a": {"type": "object", "properties": {"b": OPEN_LONG_NAME}},
            }}}]},
            "tools",
            id="messages-tool-deep-inside",
        ),
        pytest.param(
            {"tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {
                "type": "object", "description": "d" * 30000,
            }}} for i in range(10)]},
            "tools",
            id="tool-set-too-large",
        ),
        pytest.param(
            # 39 KB: 431 MiB of llama-server for one request (200 of them: 138 MiB).
            {"json_schema": {"anyOf": [
                {"type": "string", "maxLength": 2000 - i} for i in range(1000)
            ]}},
            "json_schema",
            id="schema-many-max-lengths",
        ),
        pytest.param(
            {"tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {
                "type": "array", "maxItems": 2000, "items": {"type": "string", "pattern": "a{0,2000}"},
            }}} for i in range(100)]},
            "tools",
            id="tools-many-item-and-pattern-counts",
        ),
        pytest.param(
            {"grammar_triggers": [{"type": 2, "value": nested_pattern(200)}]},
            "grammar_triggers",
            id="pattern-trigger-deep",
        ),
        pytest.param(
            # Short and shallow, and still a crash once the output is 300 characters long.
            {"grammar_triggers": [{"type": 2, "value": "^" + nested_pattern(120) + "*QQQ$"}]},
            "grammar_triggers",
            id="pattern-trigger-short",
        ),
        pytest.param(
            {"grammar_triggers": [{"type": 3, "value": "^a?a?aab$"}]},
            "grammar_triggers",
            id="full-pattern-trigger",
        ),
        pytest.param(
            # A fraction is truncated to 2 (pattern) by llama-server's int reading.
            {"grammar_triggers": [{"type": 2.5, "value": "a"}]},
            "grammar_triggers",
            id="pattern-trigger-fractional-type",
        ),
        pytest.param(
            # llama-server iterates an object's values as it does a list's items.
            {"grammar_triggers": {"t": {"type": 2, "value": "a"}}},
            "grammar_triggers",
            id="pattern-trigger-in-an-object",
        ),
        pytest.param(
            {"grammar_triggers": [{"type": 1, "value": "ab" * grammars.MAX_PATTERN_BYTES}]},
            "grammar_triggers",
            id="word-trigger-long",
        ),
        pytest.param(
            {"grammar_triggers": {"t": {"type": True, "value": "é" * grammars.MAX_PATTERN_BYTES}}},
            "grammar_triggers",
            id="word-trigger-long-in-utf8-in-an-object",
        ),
    ],
)  # fmt: skip
def test_schemas_and_patterns_past_the_bounds_are_refused(
    payload: dict[str, Any], param: str
) -> None:
    assert refusal({"messages": [], **payload}).param == param


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"json_schema": SCHEMA}, id="json_schema"),
        pytest.param(
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            id="response_format",
        ),
        pytest.param(
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]},
            id="chat-tools",
        ),
        pytest.param({"tools": [{"name": "f", "input_schema": SCHEMA}]}, id="messages-tools"),
        pytest.param(
            {
                "json_schema": {
                    "type": "object",
                    "properties": {
                        f"p{i}": {"type": "string", "minLength": 1, "maxLength": 2000}
                        for i in range(100)
                    },
                }
            },
            id="long-strings-within-the-budget",
        ),
        pytest.param(
            # A long property name is no nesting without additionalProperties.
            {"json_schema": {"type": "object", "properties": {"k" * 500: {"type": "string"}}}},
            id="long-closed-property",
        ),
        pytest.param(
            # Escaped by llama.cpp into a literal: no group to nest.
            {"grammar_triggers": [{"type": 1, "value": "(" * 300}]},
            id="word-trigger-is-no-regex",
        ),
        pytest.param(
            {"grammar_triggers": [{"type": 0, "value": "<tool_call>", "token": 5}]},
            id="token-trigger",
        ),
        pytest.param(
            {"grammar_triggers": [{"type": 1.9, "value": "<tool_call>"}]},
            id="word-trigger-fractional-type",
        ),
        pytest.param(
            # llama.cpp bounds a schema pattern's nesting itself (any string past 100).
            {"json_schema": {"type": "string", "pattern": "^" + nested_pattern(300) + "$"}},
            id="schema-pattern-is-llama-cpps-own",
        ),
    ],
)
def test_real_schemas_pass(payload: dict[str, Any]) -> None:
    bodies.inspect({"messages": [], **payload}, allow_remote_media=False)


@pytest.mark.parametrize("name", ["n_probs", "top_logprobs", "logprobs"])
def test_token_alternatives_are_bounded(name: str) -> None:
    found = refusal({"prompt": "x", name: bodies.MAX_TOP_LOGPROBS + 1})
    assert found.param == name and str(bodies.MAX_TOP_LOGPROBS) in found.message
    # llama-server reads a C int: this is 5000 alternatives there.
    assert refusal({"prompt": "x", name: 5000 - 2**32}).param == name
    assert refusal({"prompt": "x", name: -1}).param == name
    bodies.inspect({"prompt": "x", name: 0}, allow_remote_media=False)
    bodies.inspect({"prompt": "x", name: bodies.MAX_TOP_LOGPROBS}, allow_remote_media=False)


def test_logprobs_as_a_switch_passes() -> None:
    bodies.inspect({"messages": [], "logprobs": True}, allow_remote_media=False)


def test_scans_see_structure_only() -> None:
    assert grammars.gbnf_shape(JSON_GBNF) == (2, 7 + 11)  # 7 rules, 11 groups


def test_sizes_are_counted_in_utf8_bytes() -> None:
    wide = 'root ::= "' + "é" * (grammars.MAX_GRAMMAR_BYTES // 2) + '"'
    assert len(wide) < grammars.MAX_GRAMMAR_BYTES < len(wide.encode())
    assert refusal({"prompt": "x", "grammar": wide}).param == "grammar"
