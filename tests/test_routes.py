"""llama-server's whole client surface through the gateway, against a real llama-server.

One llama-server for this module, serving a tiny model with fill-in-the-middle tokens
(/infill) and a slot save directory (slot actions), with the gateway in front. Where a
route's answer is llama-server's own, the test asks both, direct and through the gateway,
and compares.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import json
import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import BACKEND_KEY, Backend, GatewayHandle, gateway_env
from support.make_model import write_model
from support.procs import (
    Process,
    answers,
    free_port,
    llama_server_bin,
    start_gateway,
    start_llama_router,
    free_ports,
    start_llama_server,
    wait_until,
)

ALICE = "sk-routes-alice-000000000"
BOB = "sk-routes-bob-0000000000000"
OPS = "sk-routes-ops-0000000000000"
TPM = "sk-routes-tpm-0000000000000"
ONE = "sk-routes-one-0000000000000"


@pytest.fixture(scope="module")
def fim_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    root = tmp_path_factory.mktemp("routes")
    model = root / "fim.gguf"
    # A context long enough that a generation outlives a disconnect test's deadlines.
    write_model(model, fim=True, context=32768)
    (root / "slots").mkdir()
    proc, port = start_llama_server(
        model,
        root / "llama-server.log",
        api_key=BACKEND_KEY,
        parallel=2,
        ctx_per_slot=16384,
        # As the supervisor runs it: the model named by an alias, not by its path.
        extra=["--slot-save-path", str(root / "slots"), "--alias", "fim"],
    )
    try:
        yield Backend(proc, port, BACKEND_KEY, model)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gw(fim_backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    root = tmp_path_factory.mktemp("routes-gw")
    keys = root / "keys.txt"
    keys.write_text(
        f"alice:{ALICE}\n"
        f"bob:{BOB}\n"
        f"ops:{OPS} scopes=inference,admin\n"
        f"tpm:{TPM} tpm=700\n"
        f"one:{ONE} concurrency=1\n"
    )
    proc, port = start_gateway(gateway_env(fim_backend.port, keys), root / "gateway.log")
    try:
        yield GatewayHandle(proc, port, fim_backend)
    finally:
        proc.stop()


def call(
    port: int,
    method: str,
    path: str,
    key: str,
    payload: dict[str, Any] | bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        sent = {"Authorization": f"Bearer {key}", **(headers or {})}
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def both(
    gw: GatewayHandle, method: str, path: str, payload: dict[str, Any] | bytes | None = None
) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    """The same request direct (backend key) and through the gateway (an inference key)."""
    direct = call(gw.backend.port, method, path, BACKEND_KEY, payload)
    through = call(gw.port, method, path, ALICE, payload)
    return (direct[0], direct[2]), (through[0], through[2])


HELLO = {"role": "user", "content": "hello"}
CHAT: dict[str, Any] = {"messages": [HELLO], "max_tokens": 3}
PROMPT = {"prompt": "hello world", "n_predict": 3}
INFILL = {"input_prefix": "def f(", "input_suffix": "):\n", "n_predict": 3}
AUDIO = (
    b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
    b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
    b"Content-Type: audio/wav\r\n\r\nRIFF\r\n--b--\r\n"
)

# One request per route of llama-server's client list, by accounting class.
SAME_AS_DIRECT: list[tuple[str, str, dict[str, Any] | None]] = [
    # generation
    ("POST", "/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", PROMPT),
    ("POST", "/completions", PROMPT),
    ("POST", "/completion", PROMPT),
    ("POST", "/infill", INFILL),
    ("POST", "/v1/responses", {"input": "hello", "max_output_tokens": 3}),
    ("POST", "/responses", {"input": "hello", "max_output_tokens": 3}),
    ("POST", "/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    # input only (this llama-server runs without --embeddings or a reranker: it refuses,
    # and the gateway passes its refusal on)
    ("POST", "/v1/embeddings", {"input": "hello"}),
    ("POST", "/embeddings", {"content": "hello"}),
    ("POST", "/embedding", {"content": "hello"}),
    ("POST", "/rerank", {"query": "a", "documents": ["b"]}),
    ("POST", "/reranking", {"query": "a", "documents": ["b"]}),
    ("POST", "/v1/rerank", {"query": "a", "documents": ["b"]}),
    ("POST", "/v1/reranking", {"query": "a", "documents": ["b"]}),
    ("POST", "/v1/systemone", {"questions": []}),
    # no slot
    ("POST", "/tokenize", {"content": "hello world"}),
    ("POST", "/detokenize", {"tokens": [1, 2, 3]}),
    ("POST", "/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/chat/completions/input_tokens", CHAT),
    ("POST", "/v1/chat/completions/input_tokens", CHAT),
    ("POST", "/responses/input_tokens", {"input": "hello"}),
    ("POST", "/v1/responses/input_tokens", {"input": "hello"}),
    ("POST", "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/lora-adapters", None),
]


@pytest.mark.parametrize(
    "method, path, payload", SAME_AS_DIRECT, ids=[f"{m} {p}" for m, p, _ in SAME_AS_DIRECT]
)
def test_each_route_answers_an_inference_key_as_llama_server_does(
    gw: GatewayHandle, method: str, path: str, payload: dict[str, Any] | None
) -> None:
    (direct_status, direct_body), (status, body) = both(gw, method, path, payload)
    assert status == direct_status, body
    if status == 200 and path in ("/tokenize", "/detokenize", "/apply-template"):
        assert json.loads(body) == json.loads(direct_body)


def test_audio_upload_reaches_llama_server_as_multipart(gw: GatewayHandle) -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    direct = call(gw.backend.port, "POST", "/v1/audio/transcriptions", BACKEND_KEY, AUDIO, headers)
    through = call(gw.port, "POST", "/v1/audio/transcriptions", ALICE, AUDIO, headers)
    # No audio model here: llama-server's own refusal, not the gateway's JSON check.
    assert through[0] == direct[0] and b"JSON" not in through[2], through


# The fields of a native reply that depend on when or where it ran.
RUN_FIELDS = ("timings", "tokens_cached", "id_slot")


def native_fields(reply: dict[str, Any]) -> dict[str, Any]:
    fields = {name: value for name, value in reply.items() if name not in RUN_FIELDS}
    return fields | {"timings": sorted(reply["timings"])}


def without_cut_character(direct: dict[str, Any]) -> dict[str, Any]:
    """A direct reply less what a stream cannot carry: a last token that ends inside a
    UTF-8 character (shown whole as U+FFFD), with its id and probabilities."""
    content = direct["content"]
    cut = len(content) - len(content.rstrip("\ufffd"))
    if not cut or direct["stop_type"] != "limit":
        return direct
    reply = {**direct, "content": content[:-cut]}
    kept = direct["tokens_predicted"] - cut
    if direct["tokens"]:
        reply["tokens"] = direct["tokens"][:kept]
    if "completion_probabilities" in direct:
        reply["completion_probabilities"] = direct["completion_probabilities"][:kept]
    return reply


@pytest.mark.parametrize(
    "path, payload",
    [
        ("/completion", {"prompt": "hello world", "n_predict": 12}),
        ("/completion", {"prompt": "hello", "n_predict": 5, "n_probs": 2, "return_tokens": True}),
        ("/completion", {"prompt": "the llama", "n_predict": 40, "stop": ["a"]}),
        ("/completions", {"prompt": "hello", "n_predict": 4}),
        ("/infill", {**INFILL, "n_predict": 6}),
    ],
    ids=["plain", "probs-and-tokens", "stop-word", "completions", "infill"],
)
def test_native_reply_equals_direct_in_the_fields_clients_read(
    gw: GatewayHandle, path: str, payload: dict[str, Any]
) -> None:
    # Greedy and seeded, so both runs generate the same tokens.
    payload = {**payload, "temperature": 0, "seed": 7, "ignore_eos": "stop" not in payload}
    (direct_status, direct_body), (status, body) = both(gw, "POST", path, payload)
    assert status == direct_status == 200, body
    direct, through = json.loads(direct_body), json.loads(body)
    expected = (native_fields(direct), native_fields(without_cut_character(direct)))
    assert native_fields(through) in expected


def test_a_batch_of_native_prompts_is_a_list_by_index(gw: GatewayHandle) -> None:
    payload = {"prompt": ["hello", "world"], "n_predict": 3, "temperature": 0, "seed": 1}
    (_, direct_body), (status, body) = both(gw, "POST", "/completion", payload)
    direct, through = json.loads(direct_body), json.loads(body)
    assert status == 200 and isinstance(through, list) and len(through) == 2
    assert len(direct) == 2
    for mine, theirs in zip(through, direct, strict=True):
        expected = (native_fields(theirs), native_fields(without_cut_character(theirs)))
        assert native_fields(mine) in expected


def predicted_total(backend: Backend) -> float:
    status, _, body = call(backend.port, "GET", "/metrics", BACKEND_KEY)
    assert status == 200
    found = re.search(rb"^llamacpp:tokens_predicted_total (\S+)$", body, re.M)
    assert found is not None
    return float(found.group(1))


def test_a_native_generation_stops_when_its_client_leaves(gw: GatewayHandle) -> None:
    before = predicted_total(gw.backend)
    payload = json.dumps({"prompt": "hi", "n_predict": 16000, "ignore_eos": True}).encode()
    client = socket.create_connection(("127.0.0.1", gw.port))
    client.sendall(
        b"POST /completion HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALICE.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(payload)
        + payload
    )
    wait_until(lambda: gw.backend.busy_slots() == 1, 20, "the generation to run")
    client.close()
    wait_until(lambda: gw.backend.busy_slots() == 0, 60, "the slot to be freed")
    # Stopped, not finished: fewer tokens than asked were generated.
    assert predicted_total(gw.backend) - before < 16000


def test_native_stream_is_relayed_and_counted(gw: GatewayHandle) -> None:
    payload = {"prompt": "hello", "n_predict": 9, "ignore_eos": True, "stream": True}
    status, headers, body = call(gw.port, "POST", "/completion", ALICE, payload)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [json.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 9
    assert b"[DONE]" not in body  # llama.cpp's native streams do not end with it


def test_props_for_an_inference_key_hold_no_path(gw: GatewayHandle) -> None:
    (_, direct_body), (status, body) = both(gw, "GET", "/props", None)
    direct, props = json.loads(direct_body), json.loads(body)
    assert status == 200 and direct["model_path"].startswith("/")
    assert props["model_path"] == "fim.gguf"
    assert props["total_slots"] == direct["total_slots"]
    assert str(gw.backend.model.parent) not in body.decode()
    assert call(gw.port, "GET", "/props", "sk-nobody")[0] == 401


def test_admin_routes_need_the_admin_scope(gw: GatewayHandle) -> None:
    admin_only: list[tuple[str, str, Any]] = [
        ("GET", "/slots", None),
        ("POST", "/slots/0?action=erase", {}),
        ("POST", "/props", {}),
        ("POST", "/lora-adapters", []),
        ("POST", "/models/load", {"model": "x"}),
        ("POST", "/models/unload", {"model": "x"}),
        ("POST", "/models", {"model": "x"}),
        ("GET", "/models/sse", None),
    ]
    for method, path, payload in admin_only:
        body = json.dumps(payload).encode() if payload is not None else None
        status, _, answer = call(gw.port, method, path, ALICE, body)
        assert status == 403, (method, path, answer)
    status, _, body = call(gw.port, "GET", "/slots", OPS)
    assert status == 200 and len(json.loads(body)) == 2


def test_slot_files_are_plain_names_never_paths(gw: GatewayHandle) -> None:
    # Something in the slot's cache to save.
    call(gw.port, "POST", "/completion", OPS, {"prompt": "hello", "n_predict": 2, "id_slot": 0})
    for name in ("../escape.bin", "/etc/passwd", "a/b.bin", ".hidden", "", "x" * 200):
        status, _, body = call(gw.port, "POST", "/slots/0?action=save", OPS, {"filename": name})
        assert status == 400 and b"filename" in body, (name, body)
    status, _, body = call(gw.port, "POST", "/slots/0?action=drop", OPS, {"filename": "a.bin"})
    assert status == 400 and b"action" in body
    assert call(gw.port, "POST", "/slots/..%2Fprops?action=save", OPS, {})[0] == 404
    status, _, body = call(gw.port, "POST", "/slots/0?action=save", OPS, {"filename": "s0.bin"})
    assert status == 200 and json.loads(body)["filename"] == "s0.bin", body
    saved = gw.backend.model.parent / "slots" / "s0.bin"
    assert saved.exists()
    status, _, body = call(gw.port, "POST", "/slots/1?action=restore", OPS, {"filename": "s0.bin"})
    assert status == 200, body
    assert call(gw.port, "POST", "/slots/1?action=erase", OPS, {})[0] == 200


def test_server_tools_are_off_as_llama_server_answers(gw: GatewayHandle) -> None:
    for method, path in (("GET", "/tools"), ("POST", "/tools"), ("GET", "/cors-proxy")):
        body = b"{}" if method == "POST" else None
        status, _, answer = call(gw.port, method, path, OPS, body)
        direct = call(gw.backend.port, method, path, BACKEND_KEY, body)
        assert status == direct[0] == 403, answer
        assert json.loads(answer)["error"]["message"] == "this feature is disabled"


def test_a_client_cannot_pick_the_slot_on_native_routes(gw: GatewayHandle) -> None:
    # Slot 1 is busy with a long stream sent straight to llama-server.
    pinned = {"prompt": "hi", "n_predict": 16000, "ignore_eos": True, "stream": True}
    hold = socket.create_connection(("127.0.0.1", gw.backend.port))
    body = json.dumps({**pinned, "id_slot": 1}).encode()
    hold.sendall(
        b"POST /completion HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + BACKEND_KEY.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    try:
        wait_until(lambda: gw.backend.busy_slots() == 1, 20, "slot 1 to be taken")
        # Asking for slot 1 through the gateway: the field is dropped, slot 0 serves it.
        payload = {"prompt": "hello", "n_predict": 2, "id_slot": 1}
        status, _, reply = call(gw.port, "POST", "/completion", ALICE, payload)
        assert status == 200 and json.loads(reply)["id_slot"] == 0
    finally:
        hold.close()
    wait_until(lambda: gw.backend.busy_slots() == 0, 60, "the pinned stream to stop")


def test_a_tool_argument_named_file_is_not_media(gw: GatewayHandle) -> None:
    messages = [
        {"role": "user", "content": "open it"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "open", "arguments": json.dumps({"file": "test.png"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "open",
                "parameters": {"type": "object", "properties": {"file": {"type": "string"}}},
            },
        }
    ]
    payload = {"messages": messages, "tools": tools, "max_tokens": 2, "file": "x.png"}
    status, _, body = call(gw.port, "POST", "/apply-template", ALICE, payload)
    assert status == 200, body
    anthropic = {
        "max_tokens": 2,
        "messages": [
            {"role": "user", "content": "open it"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "open", "input": {"file": "a.png"}}
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
        ],
    }
    status, _, body = call(gw.port, "POST", "/v1/messages/count_tokens", ALICE, anthropic)
    assert status == 200, body
    remote = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}],
            }
        ]
    }
    for path in ("/apply-template", "/chat/completions", "/v1/chat/completions/input_tokens"):
        status, _, body = call(gw.port, "POST", path, ALICE, remote)
        assert status == 400 and json.loads(body)["error"]["param"] == "image_url", path


def key_prefix(key_id: str) -> str:
    return "k" + hashlib.sha256(key_id.encode()).hexdigest()[:24] + "."


def test_resumable_streams_belong_to_the_key_that_started_them(gw: GatewayHandle) -> None:
    conv = {"X-Conversation-Id": "conv-shared-name"}
    payload = {**CHAT, "stream": True}
    status, _, first = call(gw.port, "POST", "/v1/chat/completions", ALICE, payload, conv)
    assert status == 200 and first.endswith(b"data: [DONE]\n\n")

    lookup = {"conversation_ids": ["conv-shared-name"]}
    status, _, body = call(gw.port, "POST", "/v1/streams/lookup", ALICE, lookup)
    sessions = json.loads(body)
    assert status == 200 and [s["conversation_id"] for s in sessions] == ["conv-shared-name"]
    assert sessions[0]["is_done"] is True
    # llama-server holds it under Alice's namespace, not under the name she gave.
    direct = call(gw.backend.port, "POST", "/v1/streams/lookup", BACKEND_KEY, lookup)
    assert json.loads(direct[2]) == []
    namespaced = {"conversation_ids": [key_prefix("alice") + "conv-shared-name"]}
    direct = call(gw.backend.port, "POST", "/v1/streams/lookup", BACKEND_KEY, namespaced)
    assert len(json.loads(direct[2])) == 1

    # Bob cannot find, replay or stop it.
    assert json.loads(call(gw.port, "POST", "/v1/streams/lookup", BOB, lookup)[2]) == []
    assert call(gw.port, "GET", "/v1/stream?conv_id=conv-shared-name", BOB)[0] == 404
    assert call(gw.port, "DELETE", "/v1/stream?conv_id=conv-shared-name", BOB)[0] == 204
    status, headers, replay = call(gw.port, "GET", "/v1/stream?conv_id=conv-shared-name", ALICE)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert b"chatcmpl-" in replay and replay.rstrip().endswith(b"data: [DONE]")

    # Bob's stream of the same name is his own, beside Alice's.
    status, _, _ = call(gw.port, "POST", "/v1/chat/completions", BOB, payload, conv)
    assert status == 200
    assert len(json.loads(call(gw.port, "POST", "/v1/streams/lookup", BOB, lookup)[2])) == 1
    assert call(gw.port, "DELETE", "/v1/stream?conv_id=conv-shared-name", ALICE)[0] == 204
    assert json.loads(call(gw.port, "POST", "/v1/streams/lookup", ALICE, lookup)[2]) == []
    assert len(json.loads(call(gw.port, "POST", "/v1/streams/lookup", BOB, lookup)[2])) == 1

    bad = {"X-Conversation-Id": "has space"}
    assert call(gw.port, "POST", "/v1/chat/completions", ALICE, payload, bad)[0] == 400


def control(gw: GatewayHandle, key: str, cmpl_id: str) -> dict[str, Any]:
    payload = {"id": cmpl_id, "action": "reasoning_end"}
    status, _, body = call(gw.port, "POST", "/v1/chat/completions/control", key, payload)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def test_only_the_owner_steers_a_running_completion(gw: GatewayHandle) -> None:
    payload = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3500,
        "ignore_eos": True,
        "stream": True,
        "reasoning_control": True,
    }
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    try:
        body = json.dumps(payload).encode()
        conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {ALICE}"})
        response = conn.getresponse()
        line = response.readline()
        while b"chatcmpl-" not in line:
            line = response.readline()
        found = re.search(rb"chatcmpl-[A-Za-z0-9]+", line)
        assert found is not None
        cmpl_id = found.group().decode()
        # Bob is told what llama-server tells anyone naming a completion it does not run.
        assert control(gw, BOB, cmpl_id) == {
            "success": False,
            "message": "no active completion for this id",
        }
        assert control(gw, ALICE, cmpl_id) == {"success": True}
        response.read()
    finally:
        conn.close()


def test_tpm_holds_on_completion_and_infill(gw: GatewayHandle) -> None:
    # tpm=700: a 500-token /completion settles at its real usage; the next one cannot fit.
    payload = {"prompt": "hi", "n_predict": 500, "ignore_eos": True}
    status, headers, body = call(gw.port, "POST", "/completion", TPM, payload)
    assert status == 200 and json.loads(body)["tokens_predicted"] == 500
    assert int(headers["x-ratelimit-remaining-tokens"]) <= 700
    status, headers, _ = call(gw.port, "POST", "/infill", TPM, {**INFILL, "n_predict": 300})
    assert status == 429 and "retry-after" in headers
    # A batch of native prompts counts every prompt: refused whole.
    batch = {"prompt": ["a", "b", "c"], "n_predict": 100}
    assert call(gw.port, "POST", "/completion", TPM, batch)[0] == 429


def test_batches_and_choices_beyond_the_slots_are_refused(gw: GatewayHandle) -> None:
    payload = {"prompt": ["a", "b"], "n_predict": 2, "n_cmpl": 2}
    status, _, body = call(gw.port, "POST", "/completion", ALICE, payload)
    assert status == 400 and b"at most 2" in body
    status, _, body = call(gw.port, "POST", "/infill", ALICE, {**INFILL, "n_predict": "x"})
    assert status == 400 and json.loads(body)["error"]["param"] == "n_predict"


def test_concurrency_holds_on_infill_and_completion(gw: GatewayHandle) -> None:
    long_infill = {**INFILL, "n_predict": 3500, "ignore_eos": True, "stream": True}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(call, gw.port, "POST", "/infill", ONE, long_infill)
        wait_until(lambda: gw.backend.busy_slots() == 1, 20, "the infill to run")
        status, headers, _ = call(gw.port, "POST", "/completion", ONE, PROMPT)
        assert status == 429 and headers["retry-after"] == "1"
        status, _, body = first.result()
    assert status == 200 and b'"stop":true' in body


def test_unknown_paths_and_methods(gw: GatewayHandle) -> None:
    assert call(gw.port, "POST", "/v1/nothing", ALICE, {})[0] == 404
    status, headers, _ = call(gw.port, "DELETE", "/props", OPS)
    assert status == 405 and headers["allow"] == "GET, POST"


@pytest.fixture(scope="module")
def router_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    """llama-server in router mode over two models, none loaded, and a gateway in front."""
    root = tmp_path_factory.mktemp("router")
    models = root / "models"
    for name in ("alpha", "beta"):
        write_model(models / f"{name}.gguf", fim=True)
    keys = root / "keys.txt"
    keys.write_text(f"alice:{ALICE}\nops:{OPS} scopes=inference,admin\n")
    proc, port = start_llama_router(models, root / "llama-server.log", BACKEND_KEY)
    try:
        gw_proc, gw_port = start_gateway(gateway_env(port, keys), root / "gateway.log")
        try:
            yield GatewayHandle(gw_proc, gw_port, Backend(proc, port, BACKEND_KEY, models))
        finally:
            gw_proc.stop()
    finally:
        proc.stop()


def model_states(gw: GatewayHandle) -> dict[str, str]:
    status, _, body = call(gw.backend.port, "GET", "/models", BACKEND_KEY)
    assert status == 200
    return {m["id"]: m["status"]["value"] for m in json.loads(body)["data"]}


def test_router_mode_loads_models_for_admitted_requests_only(router_gw: GatewayHandle) -> None:
    gw = router_gw
    assert model_states(gw) == {"alpha": "unloaded", "beta": "unloaded"}
    unadmitted: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/tokenize", {"model": "beta", "content": "hi"}),
        ("POST", "/apply-template", {"model": "beta", "messages": [HELLO]}),
        ("POST", "/v1/messages/count_tokens", {"model": "beta", "messages": []}),
        ("GET", "/props?model=beta&autoload=true", None),
        ("GET", "/lora-adapters?model=beta", None),
    ]
    for method, path, payload in unadmitted:
        status, _, body = call(gw.port, method, path, ALICE, payload)
        assert status == 400 and b"not loaded" in body, (path, body)
    assert model_states(gw)["beta"] == "unloaded"
    # The listing leaves out each model's command line (its paths).
    status, _, body = call(gw.port, "GET", "/models", ALICE)
    assert status == 200 and b'"args"' not in body and str(gw.backend.model) not in body.decode()
    # A generation, admitted and counted, may load it.
    payload = {"model": "beta", "prompt": "hello", "n_predict": 2}
    status, _, body = call(gw.port, "POST", "/completion", ALICE, payload, timeout=120)
    assert status == 200, body
    assert model_states(gw)["beta"] == "loaded"
    status, _, body = call(gw.port, "POST", "/tokenize", ALICE, {"model": "beta", "content": "a"})
    assert status == 200 and json.loads(body)["tokens"]


def test_a_resumable_stream_left_by_its_client_keeps_the_keys_concurrency(
    gw: GatewayHandle,
) -> None:
    # llama-server keeps generating a stream sent with X-Conversation-Id after its client
    # has gone (for a resume): the key's one request at a time stays taken meanwhile.
    payload = {"prompt": "hi", "n_predict": 16000, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    headers = {"Authorization": f"Bearer {ONE}", "X-Conversation-Id": "left-behind"}
    conn.request("POST", "/completion", json.dumps(payload).encode(), headers)
    response = conn.getresponse()
    assert response.status == 200 and response.readline()
    conn.close()  # the client leaves; the generation goes on
    lookup = {"conversation_ids": ["left-behind"]}
    sessions = json.loads(call(gw.port, "POST", "/v1/streams/lookup", ONE, lookup)[2])
    assert [s["is_done"] for s in sessions] == [False]
    assert gw.backend.busy_slots() == 1
    status, headers_, _ = call(gw.port, "POST", "/completion", ONE, PROMPT)
    assert status == 429 and headers_["retry-after"] == "1"
    # Stopped by its owner: the slot and the key's concurrency come back.
    assert call(gw.port, "DELETE", "/v1/stream?conv_id=left-behind", ONE)[0] == 204
    wait_until(
        lambda: call(gw.port, "POST", "/completion", ONE, PROMPT)[0] == 200,
        30,
        "the key's concurrency to come back",
    )


@pytest.fixture(scope="module")
def two_backends_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    """BACKENDS=2: two llama-servers of one slot each, on PORT_BACKEND and the next port."""
    root = tmp_path_factory.mktemp("two")
    model = root / "fim.gguf"
    write_model(model, fim=True, context=32768)
    first = free_ports(2)
    procs = []
    try:
        for i in range(2):
            proc, _ = start_llama_server(
                model,
                root / f"llama-server-{i}.log",
                api_key=BACKEND_KEY,
                parallel=1,
                ctx_per_slot=16384,
                port=first + i,
            )
            procs.append(proc)
        keys = root / "keys.txt"
        keys.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
        env = gateway_env(first, keys) | {"BACKENDS": "2"}
        gw_proc, gw_port = start_gateway(env, root / "gateway.log")
        try:
            yield GatewayHandle(gw_proc, gw_port, Backend(procs[0], first, BACKEND_KEY, model))
        finally:
            gw_proc.stop()
    finally:
        for proc in procs:
            proc.stop()


def test_streams_are_found_on_whichever_backend_holds_them(
    two_backends_gw: GatewayHandle,
) -> None:
    gw = two_backends_gw
    second = Backend(gw.backend.proc, gw.backend.port + 1, BACKEND_KEY, gw.backend.model)
    long = {"prompt": "hi", "n_predict": 16000, "ignore_eos": True, "stream": True}
    # Bob's long stream takes the first backend; Alice's stream then goes to the second.
    hold = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    hold.request(
        "POST", "/completion", json.dumps(long).encode(), {"Authorization": f"Bearer {BOB}"}
    )
    response = hold.getresponse()
    assert response.status == 200 and response.readline()
    conv = {"X-Conversation-Id": "on-two"}
    status, _, _ = call(gw.port, "POST", "/completion", ALICE, {**PROMPT, "stream": True}, conv)
    assert status == 200
    hold.close()
    wait_until(lambda: gw.backend.busy_slots() == 0, 60, "bob's stream to stop")
    namespaced = {"conversation_ids": [key_prefix("alice") + "on-two"]}
    direct = [
        json.loads(call(b.port, "POST", "/v1/streams/lookup", BACKEND_KEY, namespaced)[2])
        for b in (gw.backend, second)
    ]
    assert [len(found) for found in direct] == [0, 1]
    # Asked through the gateway, whose idle backend is now the first: found all the same.
    lookup = {"conversation_ids": ["on-two"]}
    sessions = json.loads(call(gw.port, "POST", "/v1/streams/lookup", ALICE, lookup)[2])
    assert [s["conversation_id"] for s in sessions] == ["on-two"]
    assert json.loads(call(gw.port, "POST", "/v1/streams/lookup", BOB, lookup)[2]) == []
    status, _, replay = call(gw.port, "GET", "/v1/stream?conv_id=on-two", ALICE)
    assert status == 200 and b'"stop":true' in replay
    assert call(gw.port, "GET", "/v1/stream?conv_id=on-two", BOB)[0] == 404
    assert call(gw.port, "DELETE", "/v1/stream?conv_id=on-two", ALICE)[0] == 204
    assert json.loads(call(gw.port, "POST", "/v1/streams/lookup", ALICE, lookup)[2]) == []


@pytest.fixture(scope="module")
def vertex_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    """Both sides as Vertex AI runs the container for predictions (AIP_MODE=PREDICTION)."""
    root = tmp_path_factory.mktemp("vertex")
    model = root / "fim.gguf"
    write_model(model, fim=True)
    port = free_port()
    args = [
        llama_server_bin(),
        "-m", str(model),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--api-key", BACKEND_KEY,
        "-np", "2",
        "-c", "4096",
        "--threads", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_ARG_", "AIP_"))}
    # llama-server listens on AIP_HTTP_PORT in this mode: its own port.
    env |= {"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": str(port)}
    proc = Process(args, env, root / "llama-server.log").start()
    try:
        wait_until(lambda: answers(port, "/health") or not proc.alive(), 60, "llama-server")
        keys = root / "keys.txt"
        keys.write_text(f"alice:{ALICE}\ntpm:{TPM} tpm=5000\n")
        settings = gateway_env(port, keys) | {
            "AIP_MODE": "PREDICTION",
            "AIP_HEALTH_ROUTE": "/vertex-health",
        }
        gw_proc, gw_port = start_gateway(settings, root / "gateway.log")
        try:
            yield GatewayHandle(gw_proc, gw_port, Backend(proc, port, BACKEND_KEY, model))
        finally:
            gw_proc.stop()
    finally:
        proc.stop()


def test_vertex_predictions_are_checked_and_counted_per_instance(vertex_gw: GatewayHandle) -> None:
    gw = vertex_gw
    assert call(gw.port, "GET", "/vertex-health", "")[0] == 200
    instances = [
        {"@requestFormat": "chatCompletions", **CHAT, "ignore_eos": True},
        {"@requestFormat": "/completion", "prompt": "hi", "n_predict": 4, "ignore_eos": True},
        {"@requestFormat": "tokenize", "content": "hello"},
    ]
    status, _, body = call(gw.port, "POST", "/predict", TPM, {"instances": instances})
    assert status == 200, body
    chat, native, tokenized = json.loads(body)["predictions"]
    assert chat["usage"]["completion_tokens"] == 3 and native["tokens_predicted"] == 4
    assert tokenized["tokens"]
    used = chat["usage"]["total_tokens"] + native["tokens_evaluated"] + 4
    # Settled to what every instance used: the next response shows what is left.
    status, headers, _ = call(gw.port, "POST", "/tokenize", TPM, {"content": "a"})
    assert status == 200 and int(headers["x-ratelimit-remaining-tokens"]) == 5000 - used

    refused = [
        ({"@requestFormat": "slots", "action": "erase"}, "instances[0].@requestFormat"),
        ({"@requestFormat": "/v1/streams/lookup"}, "instances[0].@requestFormat"),
        ({"@requestFormat": "nothing"}, "instances[0].@requestFormat"),
        (
            {
                "@requestFormat": "chatCompletions",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y"}}],
                    }
                ],
            },
            "image_url",
        ),
    ]
    for instance, param in refused:
        status, _, body = call(gw.port, "POST", "/predict", ALICE, {"instances": [instance]})
        assert status == 400 and json.loads(body)["error"]["param"] == param, body
    # An instance's length counts against the key like the request it stands for.
    big = {"@requestFormat": "completion", "prompt": "hi", "n_predict": 3000}
    status, _, _ = call(gw.port, "POST", "/predict", TPM, {"instances": [big, big, big]})
    assert status == 429


def without_ids(value: Any) -> Any:
    """A Responses reply less what differs between any two runs (ids, times) and the
    prompt-cache count the gateway does not show (EXPOSE_PROMPT_CACHE)."""
    if isinstance(value, dict):
        skip = ("id", "created_at", "completed_at", "cached_tokens")
        return {k: without_ids(v) for k, v in value.items() if k not in skip}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


@pytest.mark.parametrize("path", ["/v1/responses", "/responses"])
def test_a_responses_reply_is_rebuilt_as_llama_server_writes_it(
    gw: GatewayHandle, path: str
) -> None:
    payload = {"input": "hello", "max_output_tokens": 6, "temperature": 0, "seed": 3}
    (direct_status, direct_body), (status, body) = both(gw, "POST", path, payload)
    assert status == direct_status == 200, body
    direct, through = json.loads(direct_body), json.loads(body)
    assert list(through) == list(direct)  # the same keys, in llama-server's order
    assert through["completed_at"] == through["created_at"]
    assert without_ids(through) == without_ids(direct)


def test_a_responses_generation_stops_when_its_client_leaves(gw: GatewayHandle) -> None:
    before = predicted_total(gw.backend)
    payload = json.dumps({"input": "hi", "max_output_tokens": 16000, "ignore_eos": True})
    client = socket.create_connection(("127.0.0.1", gw.port))
    client.sendall(
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALICE.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(payload)
        + payload.encode()
    )
    wait_until(lambda: gw.backend.busy_slots() == 1, 20, "the generation to run")
    client.close()
    wait_until(lambda: gw.backend.busy_slots() == 0, 60, "the slot to be freed")
    assert predicted_total(gw.backend) - before < 16000
