"""Bounds on what reaches llama-server's grammar and JSON-schema parsers.

llama.cpp turns a body's ``grammar`` (GBNF), its JSON schemas (``json_schema``,
``response_format``, tool parameters) and its grammar-trigger regexes into parsers with
recursive-descent code that has no depth limit of its own. Past the thread's stack the
whole server dies with SIGSEGV: one request takes the container down. Measured on b11434
with an 8 MiB stack, each crashing at once:

* ``grammar`` nested 20,000 ``(`` deep (``parse_sequence`` -> ``parse_alternates``;
  15,000 passed);
* a chain of 100,000 rules each starting with the next (the left-recursion check and
  ``llama_grammar_advance_stack`` recurse once per rule; 50,000 passed);
* a schema property name of 20,000 characters in an object with ``additionalProperties``
  (json-schema-to-grammar's ``_not_strings`` nests one group per character; 5,000 passed);
* a grammar-trigger pattern nested 30,000 groups deep or 100,000 characters long
  (``std::regex`` compiles by recursion; 5,000 and 50,000 passed), and so a trigger
  word of 120,000 characters (llama.cpp escapes a word into a pattern);
* a trigger pattern of 252 bytes, ``^`` + 120 nested groups around ``[\\s\\S]`` + ``*QQQ$``,
  within any bound on its text: llama.cpp matches every pattern against all the text
  generated so far, token by token, and ``std::regex`` matches by recursion too, a few
  frames per character and group, so the stack ran out 300 characters into the output
  (one group around ``(a|b)*`` runs out near 15,000 characters, within one answer).
  Nor does a bound on its text stop backtracking: ``^`` + 26 ``a?`` + 26 ``a`` + ``b$``
  (81 bytes) took 4.4 s of CPU to match 26 generated ``a`` once, doubling with each
  ``a?``, on the one thread that runs every slot. So no pattern is accepted from a client:
  token and word triggers only (llama.cpp's own chat templates set their patterns
  server-side, over the body's).

llama.cpp guards a schema's regex ``pattern`` itself (deeper than 100 groups it accepts
any string) and repetition counts (``MAX_REPETITION_THRESHOLD``, refused cleanly), so
those pass here. An object with many optional properties is the one cost that grows
faster than its text: 2,000 properties took 25 s of llama-server's CPU (256: 0.14 s).

So every such field is bounded here, by field name, whatever the route, far inside the
crashes above and far above what real grammars, schemas and tool sets use. A field past
a limit is a 400 naming it (``param``), before the body reaches llama-server. Pure
functions over a parsed body; the scans are regular expressions or loops over
already-parsed JSON, so a hostile field costs linear time here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .refusals import Refusal, bad_request

# Parentheses nested in a GBNF grammar, and
# characters of a property name that json-schema-to-grammar nests one group each for.
MAX_NESTING = 128
# Rule definitions plus groups in a GBNF grammar: a chain of rules each starting with a
# reference to the next recurses once per rule in llama.cpp's left-recursion check.
MAX_GRAMMAR_RULES = 8192
# Symbols llama.cpp's parser builds for a grammar once it unrolls the repetitions:
# x{m,n} becomes m copies of x and n - m rules each holding x again (n past 2,000 counts
# as unbounded). 1,000 of '"a"{0,2000}' (12 KB, 8 million symbols) took llama-server 8 s
# and 486 MiB; 5,000 of them (60 KB) did not finish in 300 s; 100 took 0.2 s and 73 MiB.
MAX_GRAMMAR_EXPANSION = 1_000_000
# llama.cpp's MAX_REPETITION_THRESHOLD: a larger upper count is unbounded there.
_MAX_REPETITION = 2000
# A grammar's text, and a schema (all tools' parameters together) as compact JSON.
MAX_GRAMMAR_BYTES = 256 * 1024
MAX_SCHEMA_BYTES = 256 * 1024
# One grammar-trigger word (a literal, but compiled into a regex all the same).
MAX_PATTERN_BYTES = 4096
# Properties of one schema object: json-schema-to-grammar's optional-property rules
# grow with the cube of their count.
MAX_PROPERTIES = 256

# GBNF tokens that can hold parentheses without nesting anything: string literals and
# character classes (with their escapes) and comments. What is left is structure.
_GBNF_INERT = r'"(?:\\.|[^"\\])*"?|\[(?:\\.|[^\]\\])*\]?|#[^\r\n]*'
_GBNF_TOKEN = re.compile(_GBNF_INERT + r"|::=|[()]", re.DOTALL)
# llama.cpp's grammar trigger types: a token is matched by id, a word is escaped into a
# literal pattern; the others (pattern, full pattern) are client regexes, refused.
_TOKEN_TRIGGER, _WORD_TRIGGER = 0, 1


def _too_deep(field: str, what: str) -> Refusal:
    return bad_request(
        f"'{field}' {what} nests deeper than {MAX_NESTING} levels", "grammar", param=field
    )


def _too_large(field: str, what: str, limit: int) -> Refusal:
    return bad_request(f"'{field}' {what} is larger than {limit} bytes", "grammar", param=field)


def gbnf_shape(text: str) -> tuple[int, int]:
    """The deepest parenthesis nesting and the rules (definitions and groups) of a grammar."""
    depth = deepest = rules = 0
    for match in _GBNF_TOKEN.finditer(text):
        token = match.group()
        if token == "(":
            depth += 1
            rules += 1
            deepest = max(deepest, depth)
        elif token == ")":
            depth = max(0, depth - 1)
        elif token == "::=":
            rules += 1
    return deepest, rules


# Items and the repetitions after them: literals, classes, names, `.`, groups, then
# `*`, `+`, `?` or `{m}`, `{m,}`, `{m,n}` (counts past 6 digits are only "large").
_GBNF_ITEM = re.compile(
    _GBNF_INERT + r"|\{\s*(\d*)\s*(,\s*(\d*)\s*)?\}|[*+?()]|[A-Za-z0-9_-]+|\.", re.DOTALL
)


def _count(digits: str | None, default: int) -> int:
    if not digits:
        return default
    return int(digits) if len(digits) <= 6 else 10**6


def _repetition_cost(item: int, lo: int, hi: int | None) -> int:
    """Symbols llama.cpp's handle_repetitions builds for item{lo,hi} (hi None: no bound)."""
    if hi is not None and hi > _MAX_REPETITION:
        hi = None
    copies = item * lo
    return copies + (item + 3 if hi is None else max(0, hi - lo) * (item + 3))


def gbnf_expansion(text: str) -> int:
    """About how many symbols llama.cpp's parser builds for a grammar, repetitions
    unrolled as its handle_repetitions does (an upper estimate)."""
    total = 0
    item = 1  # symbols of the item a repetition applies to
    for match in _GBNF_ITEM.finditer(text):
        token = match.group()
        first = token[0]
        if first == "#":
            continue
        if first in "*+?{":
            if first == "{":
                lo = _count(match.group(1), 0)
                hi: int | None = lo if match.group(2) is None else _count(match.group(3), -1)
                hi = None if hi == -1 else hi
            else:
                lo, hi = (1 if first == "+" else 0), (1 if first == "?" else None)
            total += _repetition_cost(item, lo, hi)
            item = item * lo + 1
            continue
        # A literal or class is a symbol per character (an over-estimate for escapes and
        # ranges); a name, `.` or a group (a generated rule) is one.
        item = max(1, len(token) - 2) if first in '"[' else 1
        total += item
    return total


def check_gbnf(text: str, field: str) -> None:
    # Characters first: only text that could be past the bound in UTF-8 is encoded.
    if len(text) > MAX_GRAMMAR_BYTES or (
        4 * len(text) > MAX_GRAMMAR_BYTES and len(text.encode()) > MAX_GRAMMAR_BYTES
    ):
        raise _too_large(field, "grammar", MAX_GRAMMAR_BYTES)
    deepest, rules = gbnf_shape(text)
    if deepest > MAX_NESTING:
        raise _too_deep(field, "grammar")
    if rules > MAX_GRAMMAR_RULES:
        raise bad_request(
            f"'{field}' grammar has more than {MAX_GRAMMAR_RULES} rules and groups",
            "grammar",
            param=field,
        )
    if gbnf_expansion(text) > MAX_GRAMMAR_EXPANSION:
        raise bad_request(
            f"'{field}' grammar unrolls to more than {MAX_GRAMMAR_EXPANSION} symbols "
            "(each x{m,n} is n copies of x)",
            "grammar",
            param=field,
        )


# Repetitions in a schema's regex ``pattern``: json-schema-to-grammar writes them as the
# same GBNF repetitions.
_REGEX_REPEAT = re.compile(r"\\.|\[(?:\\.|[^\]\\])*\]?|\{\s*(\d*)\s*(,\s*(\d*)\s*)?\}", re.DOTALL)


def _schema_count(value: object, default: int | None) -> int | None:
    """A schema's length or item count as llama.cpp reads it (a whole number)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return max(0, min(value, 10**6))
    return default


def schema_expansion(node: dict[str, Any]) -> int:
    """Symbols one schema node's repetitions unroll to in llama-server's grammar:
    minLength/maxLength become char{m,n}, minItems/maxItems item{m-1,n-1} after the
    first, a pattern's {m,n} the same."""
    cost = 0
    lo, hi = _schema_count(node.get("minLength"), None), _schema_count(node.get("maxLength"), None)
    if lo is not None or hi is not None:
        cost += _repetition_cost(1, lo or 0, hi)
    lo, hi = _schema_count(node.get("minItems"), None), _schema_count(node.get("maxItems"), None)
    if lo is not None or hi is not None:
        cost += _repetition_cost(1, max(0, (lo or 0) - 1), None if hi is None else max(0, hi - 1))
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        for match in _REGEX_REPEAT.finditer(pattern):
            if match.group().startswith("{"):
                lo = _count(match.group(1), 0)
                hi = lo if match.group(2) is None else _count(match.group(3), -1)
                cost += _repetition_cost(1, lo, None if hi == -1 else hi)
    return cost


def _schema_size(schemas: list[object]) -> int:
    return sum(len(json.dumps(s, separators=(",", ":"))) for s in schemas)


def check_schemas(schemas: list[object], field: str) -> None:
    """Bound JSON schemas that llama-server turns into one grammar (a tool set: several)."""
    if _schema_size(schemas) > MAX_SCHEMA_BYTES:
        raise _too_large(field, "schema", MAX_SCHEMA_BYTES)
    # The body's own nesting is bounded already (bodies.MAX_DEPTH): a plain walk is safe.
    stack: list[object] = list(schemas)
    expansion = 0
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        expansion += schema_expansion(node)
        if expansion > MAX_GRAMMAR_EXPANSION:
            raise bad_request(
                f"'{field}' unrolls to more than {MAX_GRAMMAR_EXPANSION} grammar symbols "
                "(each maxLength, maxItems and pattern count n is n copies)",
                "grammar",
                param=field,
            )
        properties = node.get("properties")
        if isinstance(properties, dict):
            if len(properties) > MAX_PROPERTIES:
                raise bad_request(
                    f"'{field}' has an object with more than {MAX_PROPERTIES} properties",
                    "grammar",
                    param=field,
                )
            open_ended = node.get("additionalProperties", False) is not False
            if open_ended and any(len(name) > MAX_NESTING for name in properties):
                raise bad_request(
                    f"'{field}' has a property name longer than {MAX_NESTING} characters "
                    "in an object with additionalProperties",
                    "grammar",
                    param=field,
                )
        stack.extend(node.values())


def _get(value: object, *path: str) -> object:
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _tool_schemas(tools: object) -> list[object]:
    """Parameter schemas of a tool list in any of the shapes llama-server reads."""
    if not isinstance(tools, list):
        return []
    found: list[object] = []
    for tool in tools:
        # Chat: function.parameters; Responses: parameters; Anthropic: input_schema.
        for path in (("function", "parameters"), ("parameters",), ("input_schema",)):
            schema = _get(tool, *path)
            if schema is not None:
                found.append(schema)
    return found


def check(payload: dict[str, Any]) -> None:
    """Refuse a body whose grammar, schemas or trigger patterns exceed the bounds."""
    grammar = payload.get("grammar")
    if isinstance(grammar, str):
        check_gbnf(grammar, "grammar")
    for field, path in (
        ("json_schema", ("json_schema",)),
        ("response_format.schema", ("response_format", "schema")),
        ("response_format.json_schema.schema", ("response_format", "json_schema", "schema")),
        # Responses API structured output (b11434 ignores it; later builds read it).
        ("text.format.schema", ("text", "format", "schema")),
    ):
        schema = _get(payload, *path)
        if schema is not None:
            check_schemas([schema], field)
    tool_schemas = _tool_schemas(payload.get("tools"))
    if tool_schemas:
        check_schemas(tool_schemas, "tools")
    check_triggers(payload.get("grammar_triggers"))


def check_triggers(triggers: object) -> None:
    """Token and word triggers only, words of bounded size.

    llama-server iterates the field as its JSON library does: a list's items and also an
    object's values. It reads each ``type`` as a C int (a bool as 0 or 1, a fraction
    truncated); a type that is no number it refuses itself, and so does this.
    """
    if isinstance(triggers, dict):
        entries: list[object] = list(triggers.values())
    elif isinstance(triggers, list):
        entries = triggers
    else:
        return
    for trigger in entries:
        kind = _get(trigger, "type")
        if kind is None:
            continue  # not a trigger llama-server can read: it refuses the body itself
        if not isinstance(kind, (int, float)) or int(kind) not in (_TOKEN_TRIGGER, _WORD_TRIGGER):
            raise bad_request(
                "'grammar_triggers' takes token (type 0) and word (type 1) triggers only: "
                "llama-server matches a pattern trigger against all the text generated so "
                "far by recursion, which a short pattern can make crash it",
                "grammar",
                param="grammar_triggers",
            )
        value = _get(trigger, "value")
        if int(kind) == _WORD_TRIGGER and isinstance(value, str):
            if len(value.encode()) > MAX_PATTERN_BYTES:
                raise _too_large("grammar_triggers", "word", MAX_PATTERN_BYTES)
