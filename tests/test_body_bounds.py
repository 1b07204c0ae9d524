"""Bodies that made llama-server crash, the gateway swell, or a key spend past its limits,
against the real llama-server and gateway."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ALICE, BACKEND_KEY, Backend, GatewayFactory, GatewayHandle, gateway_env
from support.make_model import write_model
from support.procs import start_gateway, start_llama_server
from test_keys_and_limits import limited_gateway
from test_limits_hold import post, tokens_counted

CRASHING_GRAMMAR = "root ::= " + "(" * 30000 + '"a"' + ")" * 30000
SHORT_CRASHING_PATTERN = "^" + "(" * 120 + "[\\s\\S]" + ")" * 120 + "*QQQ$"
# A lazy grammar waits for its trigger: llama-server matches the triggers against all the
# text generated so far, after every token.
LAZY = {"grammar": 'root ::= "a"', "grammar_lazy": True, "n_predict": 600, "ignore_eos": True}


SLOT_CTX = 8192
MESSAGES_KEY = "sk-messages-tpm"


@pytest.fixture(scope="module")
def own_stack(keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    """A llama-server and gateway of this module's own: a regression here must not take
    the session's llama-server down with it. Its slots hold more than /v1/messages'
    default length (the session's model is trained for 4,096 tokens, which caps them)."""
    logs = tmp_path_factory.mktemp("bounds")
    model = logs / "long.gguf"
    write_model(model, context=4 * SLOT_CTX)
    keys = logs / "keys.txt"
    keys.write_text(keys_file.read_text() + f"m:{MESSAGES_KEY} tpm=6000\n")
    server, port = start_llama_server(
        model, logs / "llama-server.log", api_key=BACKEND_KEY, ctx_per_slot=SLOT_CTX
    )
    try:
        gw, gw_port = start_gateway(gateway_env(port, keys), logs / "gateway.log")
        try:
            yield GatewayHandle(gw, gw_port, Backend(server, port, BACKEND_KEY, model))
        finally:
            gw.stop()
    finally:
        server.stop()


def test_nested_grammar_is_refused_and_llama_server_stays_up(own_stack: GatewayHandle) -> None:
    gw = own_stack
    payload = {"prompt": "x", "max_tokens": 2, "grammar": CRASHING_GRAMMAR}
    assert len(json.dumps(payload)) > 60_000
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = {**payload, "messages": [{"role": "user", "content": "x"}]}
        status, _, answer = post(gw.port, path, ALICE, body)
        assert status == 400, answer
        error = json.loads(answer)["error"]
        assert error["param"] == "grammar" and error["type"] == "invalid_request_error"
    assert gw.backend.proc.alive()
    # 60 KB and a single rule, unrolled by llama-server's parser into 40 million symbols:
    # it had not answered after 300 s, its memory growing.
    unrolled = {"prompt": "x", "max_tokens": 2, "grammar": "root ::= " + '"a"{0,2000} ' * 5000}
    status, _, answer = post(gw.port, "/completion", ALICE, unrolled)
    assert status == 400 and json.loads(answer)["error"]["param"] == "grammar", answer
    # A real grammar and a real schema still constrain what llama-server generates.
    grammar = {"prompt": "x", "max_tokens": 8, "grammar": 'root ::= "yes" | "no"'}
    status, _, answer = post(gw.port, "/v1/completions", ALICE, grammar)
    assert status == 200, answer
    assert json.loads(answer)["choices"][0]["text"] in ("yes", "no")
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    # (Chat with a schema fails inside this llama-server with the tiny model's template,
    # gateway or not: "Failed to initialize samplers". Text completions take one.)
    constrained = {"prompt": "x", "max_tokens": 200, "json_schema": schema}
    status, _, answer = post(gw.port, "/v1/completions", ALICE, constrained)
    assert status == 200, answer
    content = json.loads(answer)["choices"][0]["text"]
    assert re.fullmatch(r'\{\s*"ok"\s*:\s*(true|false)\s*\}\s*', content), content


@pytest.mark.parametrize(
    "path, extra, param",
    [
        pytest.param(
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {
                "type": "object",
                "properties": {"k" * 20000: {"type": "string"}},
                "additionalProperties": True,
            }}}},
            "response_format.json_schema.schema",
            id="long-open-property-name",
        ),
        pytest.param(
            "/v1/completions",
            {"grammar": 'root ::= "a"', "grammar_lazy": True, "grammar_triggers": [
                {"type": 2, "value": "(" * 30000 + "a" + ")" * 30000},
            ]},
            "grammar_triggers",
            id="nested-trigger-pattern",
        ),
        # 252 bytes, 120 groups: on the bounds' old reading it passed, and llama-server
        # died 300 characters into the output (std::regex matches by recursion).
        pytest.param(
            "/completion",
            {**LAZY, "grammar_triggers": [{"type": 2, "value": SHORT_CRASHING_PATTERN}]},
            "grammar_triggers",
            id="short-trigger-pattern",
        ),
        pytest.param(
            "/v1/completions",
            {**LAZY, "grammar_triggers": {"t": {"type": 2, "value": SHORT_CRASHING_PATTERN}}},
            "grammar_triggers",
            id="trigger-pattern-in-an-object",
        ),
        # Not a crash: 39 KB that llama-server unrolled into 431 MiB of grammar (a 256 KiB
        # schema of the same: gigabytes, per request).
        pytest.param(
            "/completion",
            {"json_schema": {"anyOf": [
                {"type": "string", "maxLength": 2000 - i} for i in range(1000)
            ]}},
            "json_schema",
            id="schema-unrolled",
        ),
        pytest.param(
            "/infill",
            {**LAZY, "input_prefix": "x", "input_suffix": "y",
             "grammar_triggers": [{"type": 1, "value": "ab" * 60000}]},
            "grammar_triggers",
            id="long-trigger-word",
        ),
    ],
)  # fmt: skip
def test_other_crashing_grammar_inputs_are_refused_naming_the_field(
    own_stack: GatewayHandle, path: str, extra: dict[str, object], param: str
) -> None:
    payload = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    status, _, answer = post(own_stack.port, path, ALICE, {**payload, **extra})
    assert status == 400, answer
    assert json.loads(answer)["error"]["param"] == param
    assert own_stack.backend.proc.alive()


def test_a_word_trigger_still_reaches_llama_server(own_stack: GatewayHandle) -> None:
    payload = {
        "prompt": "x",
        "n_predict": 8,
        "grammar": 'root ::= "a"',
        "grammar_lazy": True,
        "grammar_triggers": [{"type": 1, "value": "<tool_call>"}],
    }
    status, _, answer = post(own_stack.port, "/completion", ALICE, payload)
    assert status == 200, answer
    assert json.loads(answer)["tokens_predicted"] >= 1
    # The same body with the word as a pattern is refused before llama-server sees it.
    payload["grammar_triggers"] = [{"type": 2, "value": "<tool_call>"}]
    status, _, answer = post(own_stack.port, "/completion", ALICE, payload)
    assert status == 400 and json.loads(answer)["error"]["param"] == "grammar_triggers", answer


@pytest.mark.parametrize(
    "path, payload, param",
    [
        ("/completion", {"prompt": "x", "n_predict": 2}, "n_probs"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2}, "logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True},
            "top_logprobs",
        ),
    ],
)
def test_a_negative_count_of_alternatives_is_refused(
    own_stack: GatewayHandle, path: str, payload: dict[str, object], param: str
) -> None:
    """llama-server reads the count as a C int: 5000 - 2**32 was every token of the
    vocabulary per generated token (270 here) past the cap of 20."""
    status, _, answer = post(own_stack.port, path, ALICE, {**payload, param: 5000 - 2**32})
    assert status == 400 and json.loads(answer)["error"]["param"] == param, answer[:300]


def rss_now(pid: int) -> int:
    """The resident size in KiB, with the peak (VmHWM) reset to it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: resets VmHWM to VmRSS
    return rss_kib(pid, "VmRSS")


def rss_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1))


def test_logprobs_cannot_swell_the_gateway(own_stack: GatewayHandle) -> None:
    gw = own_stack
    # Enough tokens that some end on a whole character: llama-server lists no logprobs for a
    # token that ends inside a UTF-8 sequence, and the tiny model's tokens are often bytes.
    ask = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 32, "logprobs": True}
    # More alternatives than the cap: refused before llama-server runs anything.
    status, _, answer = post(gw.port, "/v1/chat/completions", ALICE, {**ask, "top_logprobs": 1000})
    assert status == 400 and json.loads(answer)["error"]["param"] == "top_logprobs", answer
    status, _, answer = post(gw.port, "/v1/completions", ALICE, {"prompt": "x", "n_probs": 1000})
    assert status == 400 and json.loads(answer)["error"]["param"] == "n_probs", answer
    # Within the cap, a small request still asks for a large answer: four choices of 6,000
    # tokens with 20 alternatives each (about 30 MB as JSON). Assembled, it is refused once
    # it outgrows the bound, and the gateway's memory stays near where it was.
    status, _, answer = post(gw.port, "/v1/chat/completions", ALICE, {**ask, "top_logprobs": 20})
    assert status == 200 and json.loads(answer)["choices"][0]["logprobs"]["content"], answer
    before = rss_now(gw.proc.pid)
    big = {**ask, "top_logprobs": 20, "n": 4, "max_tokens": 6000, "ignore_eos": True}
    status, headers, answer = post(gw.port, "/v1/chat/completions", ALICE, big, timeout=300)
    grown_mib = (rss_kib(gw.proc.pid, "VmHWM") - before) / 1024
    assert grown_mib < 120, f"the gateway grew by {grown_mib:.0f} MiB (status {status})"
    assert status == 502, (status, answer[:300])
    error = json.loads(answer)["error"]
    assert "stream" in error["message"] and headers["x-should-retry"] == "false"
    # One choice of 8,000 tokens fits (about 8.5 MiB as JSON): its logprobs are held as
    # the text they came as, not parsed (which took about 100 MiB here).
    before = rss_now(gw.proc.pid)
    one = {**big, "n": 1, "max_tokens": 8000}
    status, _, answer = post(gw.port, "/v1/chat/completions", ALICE, one, timeout=300)
    grown_mib = (rss_kib(gw.proc.pid, "VmHWM") - before) / 1024
    # The size depends on the random text (7.9 to 8.5 MB seen); what matters is that it is
    # several times what the gateway may grow by.
    assert status == 200 and len(answer) > 6_000_000, (status, answer[:300])
    whole = json.loads(answer)
    assert whole["usage"]["completion_tokens"] == 8000 and whole["choices"][0]["logprobs"]
    assert grown_mib < 70, f"the gateway grew by {grown_mib:.0f} MiB for {len(answer)} bytes"
    # llama.cpp's native completion is assembled in its own format, under the same bound.
    native = {"prompt": ["x"] * 4, "n_probs": 20, "n_predict": 6000, "ignore_eos": True}
    before = rss_now(gw.proc.pid)
    status, headers, answer = post(gw.port, "/completion", ALICE, native, timeout=300)
    grown_mib = (rss_kib(gw.proc.pid, "VmHWM") - before) / 1024
    assert grown_mib < 120, f"the gateway grew by {grown_mib:.0f} MiB (status {status})"
    assert status == 502 and headers["x-should-retry"] == "false", (status, answer[:300])
    status, _, answer = post(gw.port, "/completion", ALICE, {"prompt": "x", "n_probs": 1000})
    assert status == 400 and json.loads(answer)["error"]["param"] == "n_probs", answer
    # The same request as a stream is relayed, not held.
    status, _, answer = post(
        gw.port, "/v1/chat/completions", ALICE, {**big, "n": 1, "stream": True}, timeout=300
    )
    assert status == 200 and answer.rstrip().endswith(b"[DONE]")


def test_responses_reserve_by_the_length_llama_server_obeys(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "r:sk-responses-tpm tpm=1000\n")
    # llama-server copies max_output_tokens into max_tokens, behind max_completion_tokens.
    payload = {
        "input": "hi",
        "max_output_tokens": 10,
        "max_completion_tokens": 600,
        "ignore_eos": True,
    }
    status, _, answer = post(gw.port, "/v1/responses", "sk-responses-tpm", payload)
    assert status == 200, answer
    assert json.loads(answer)["usage"]["output_tokens"] == 600
    # 600 and more are spent of 1,000: a second 600 does not fit.
    status, headers, answer = post(gw.port, "/v1/responses", "sk-responses-tpm", payload)
    assert status == 429, answer
    counted = tokens_counted(gw, "r")
    assert counted["prompt"] + counted["completion"] <= 1000


def test_messages_without_a_length_limit_reserve_the_slot_context(
    own_stack: GatewayHandle,
) -> None:
    # A slot holds 8,192 tokens, more than this key's 6,000 a minute: a request that may
    # fill one can never fit. Without max_tokens llama-server stops at 4,096, which fits.
    gw = own_stack
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for unlimited in (-1, None):
        payload = {**base, "max_tokens": unlimited}
        status, headers, answer = post(gw.port, "/v1/messages", MESSAGES_KEY, payload)
        assert status == 429 and headers["x-should-retry"] == "false", answer
    status, _, answer = post(gw.port, "/v1/messages", MESSAGES_KEY, {**base, "max_tokens": -2})
    assert status == 400 and json.loads(answer)["error"]["param"] == "max_tokens", answer
    status, _, answer = post(gw.port, "/v1/messages", MESSAGES_KEY, {**base, "max_tokens": 5})
    assert status == 200, answer
    assert tokens_counted(gw, "m")["completion"] <= 5


def test_embedding_batches_by_content_are_planned_like_input(
    make_gateway: GatewayFactory, backend: Backend, tmp_path: Path
) -> None:
    gw = limited_gateway(make_gateway, tmp_path, "e:sk-embed-alias tpm=18000\n")
    # 40 inputs of about 450 tokens: 18,000 and more in all, more than one slot's context
    # (16,384), which is all one task could ever hold.
    batch = ["x" * 450] * 40
    for field in ("input", "content"):
        status, headers, answer = post(gw.port, "/v1/embeddings", "sk-embed-alias", {field: batch})
        assert status == 429 and headers["x-should-retry"] == "false", (field, answer[:200])
    # A batch that fits runs every input; by content the answer is llama-server's own list.
    status, _, answer = post(
        gw.port, "/v1/embeddings", "sk-embed-alias", {"content": ["one", "two", "three"]}
    )
    assert status == 200, answer
    assert len(json.loads(answer)) == 3


def test_rerank_by_texts_counts_every_document(
    model_file: Path, keys_file: Path, tmp_path: Path
) -> None:
    server, port = start_llama_server(
        model_file, tmp_path / "llama-server.log", api_key=BACKEND_KEY, extra=["--reranking"]
    )
    try:
        keys = tmp_path / "keys.txt"
        keys.write_text(keys_file.read_text() + "r:sk-rerank-tpm tpm=2000\n")
        gw, gw_port = start_gateway(gateway_env(port, keys), tmp_path / "gateway.log")
        try:
            # Each document is scored with the query: ten of them run the 400-byte query
            # ten times, about 4,000 tokens, whichever name the list has. By texts (the TEI
            # format) the answer carries no usage to settle on.
            query = {"query": "q" * 400}
            for field in ("documents", "texts"):
                body = {**query, field: [f"doc {i}" for i in range(10)]}
                status, headers, answer = post(gw_port, "/v1/rerank", "sk-rerank-tpm", body)
                assert status == 429 and headers["x-should-retry"] == "false", (field, answer)
            small = {"query": "q", "texts": ["a", "b", "c"]}
            status, _, answer = post(gw_port, "/v1/rerank", "sk-rerank-tpm", small)
            assert status == 200 and len(json.loads(answer)) == 3, answer
            # A negative top_n made llama-server resize its results to 2**64 - 1 (a 500).
            status, _, answer = post(gw_port, "/v1/rerank", "sk-rerank-tpm", {**small, "top_n": -1})
            assert status == 400 and json.loads(answer)["error"]["param"] == "top_n", answer
        finally:
            gw.stop()
    finally:
        server.stop()


OPEN_SCHEMA = {
    "type": "object",
    "properties": {"k" * 20000: {"type": "string"}},
    "additionalProperties": True,
}
CHAT_MESSAGES = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def tool_stack(
    model_file: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayHandle]:
    """A llama-server whose chat template has a tool-call format: tool schemas become
    grammars there."""
    logs = tmp_path_factory.mktemp("tools")
    template = Path(__file__).parent / "data" / "tool_call_template.jinja"
    server, port = start_llama_server(
        model_file,
        logs / "llama-server.log",
        api_key=BACKEND_KEY,
        parallel=1,
        ctx_per_slot=4096,
        extra=["--jinja", "--chat-template-file", str(template)],
    )
    try:
        gw, gw_port = start_gateway(gateway_env(port, keys_file), logs / "gateway.log")
        try:
            yield GatewayHandle(gw, gw_port, Backend(server, port, BACKEND_KEY, model_file))
        finally:
            gw.stop()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "path, payload",
    [
        pytest.param(
            "/v1/chat/completions",
            {"messages": CHAT_MESSAGES, "tools": [
                {"type": "function", "function": {"name": "f", "parameters": OPEN_SCHEMA}}
            ]},
            id="chat",
        ),
        pytest.param(
            "/v1/messages",
            {"model": "m", "messages": CHAT_MESSAGES, "tools": [
                {"name": "f", "description": "d", "input_schema": OPEN_SCHEMA}
            ]},
            id="messages",
        ),
        pytest.param(
            "/v1/responses",
            {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": OPEN_SCHEMA}]},
            id="responses",
        ),
    ],
)  # fmt: skip
def test_tool_schemas_that_crashed_llama_server_are_refused(
    tool_stack: GatewayHandle, path: str, payload: dict[str, object]
) -> None:
    status, _, answer = post(tool_stack.port, path, ALICE, {**payload, "max_tokens": 2})
    assert status == 400, answer
    assert json.loads(answer)["error"]["param"] == "tools"
    assert tool_stack.backend.proc.alive()
    # A real tool still reaches llama-server's tool-call grammar.
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": schema}}]
    real = {"messages": CHAT_MESSAGES, "tools": tools, "max_tokens": 16}
    status, _, answer = post(tool_stack.port, "/v1/chat/completions", ALICE, real)
    assert status == 200, answer
