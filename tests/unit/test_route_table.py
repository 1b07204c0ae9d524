"""The route table against llama-server b11434's own route list, and the pure helpers of
the stateful routes (tenancy.py), reply scrubbing (scrub.py) and Vertex AI (vertex.py)."""

from __future__ import annotations

import json

import pytest

from gguf_gateway import tenancy, vertex
from gguf_gateway.refusals import Refusal
from gguf_gateway.routes import ROUTES, Cost, Form, Kind
from gguf_gateway.scrub import scrub_paths

# tools/server/server.cpp at b11434, as it registers them (method, path); /health and
# /metrics are the gateway's own, /v1/health is a probe llama-server keeps for itself.
LLAMA_SERVER_ROUTES = """
POST /models
POST /models/load
POST /models/unload
GET /models/sse
DELETE /models
GET /props
POST /props
GET /models
GET /v1/models
POST /completion
POST /completions
POST /v1/completions
POST /chat/completions
POST /v1/chat/completions
POST /v1/chat/completions/control
POST /v1/responses
POST /responses
POST /v1/audio/transcriptions
POST /audio/transcriptions
POST /v1/messages
POST /infill
POST /embedding
POST /embeddings
POST /v1/embeddings
POST /rerank
POST /reranking
POST /v1/rerank
POST /v1/reranking
POST /v1/systemone
POST /tokenize
POST /detokenize
POST /apply-template
POST /chat/completions/input_tokens
POST /v1/chat/completions/input_tokens
POST /responses/input_tokens
POST /v1/responses/input_tokens
POST /v1/messages/count_tokens
GET /lora-adapters
POST /lora-adapters
GET /slots
POST /slots/:id_slot
GET /v1/stream
POST /v1/streams/lookup
DELETE /v1/stream
GET /cors-proxy
POST /cors-proxy
GET /tools
POST /tools
"""


def test_every_route_llama_server_serves_to_clients_is_in_the_table() -> None:
    missing = []
    for line in LLAMA_SERVER_ROUTES.split("\n"):
        if line:
            method, path = line.split()
            route = ROUTES.route(path, method) if path in ROUTES.by_path else None
            if route is None or route.kind is not Kind.PROXY:
                missing.append(line)
    assert missing == []


@pytest.mark.parametrize(
    "path, method, scope, cost",
    [
        ("/completion", "POST", "inference", Cost.GENERATE),
        ("/infill", "POST", "inference", Cost.GENERATE),
        ("/embedding", "POST", "inference", Cost.INPUT),
        ("/apply-template", "POST", "inference", Cost.FREE),
        ("/props", "GET", "inference", Cost.FREE),
        ("/props", "POST", "admin", Cost.FREE),
        ("/slots/:id_slot", "POST", "admin", Cost.FREE),
        ("/v1/stream", "DELETE", "inference", Cost.OWNED),
        ("/tools", "POST", "admin", Cost.DISABLED),
    ],
)
def test_scope_and_accounting_class_per_line(
    path: str, method: str, scope: str, cost: Cost
) -> None:
    route = ROUTES.route(path, method)
    assert route is not None and (route.scope, route.cost) == (scope, cost)


def test_only_digits_reach_a_slot_and_other_paths_are_unknown() -> None:
    assert ROUTES.path_of("/slots/3") == ("/slots/:id_slot", "3")
    for path in ("/slots/x", "/slots/../props", "/slots/1/2", "/slots/", "/v1/health", "/nope"):
        assert ROUTES.path_of(path) is None, path


def test_a_conversation_id_is_the_keys_own_and_restored_on_the_way_back() -> None:
    alice, bob = tenancy.namespace("alice"), tenancy.namespace("bob")
    assert alice != bob and len(alice) == len(bob)
    assert tenancy.conversation_id("alice", "c1") == alice + "c1"
    with pytest.raises(Refusal):
        tenancy.conversation_id("alice", "with space")
    body = tenancy.lookup_body("alice", {"conversation_ids": ["c1", 3, ""]})
    assert body["conversation_ids"] == [alice + "c1"]
    answer = json.dumps(
        [
            {"conversation_id": alice + "c1", "is_done": True},
            {"conversation_id": bob + "c1", "is_done": False},
        ]
    ).encode()
    assert json.loads(tenancy.lookup_reply("alice")(answer)) == [
        {"conversation_id": "c1", "is_done": True}
    ]


def test_a_control_on_another_keys_completion_names_none() -> None:
    completions = tenancy.Completions()
    assert completions.watcher("alice")(b'data: {"id":"chatcmpl-abc123","choices":[]}')
    mine = {"id": "chatcmpl-abc123", "action": "reasoning_end"}
    assert not tenancy.control_body(completions, "alice", dict(mine))
    theirs = dict(mine)
    assert tenancy.control_body(completions, "bob", theirs)
    assert theirs["id"] == tenancy.NOBODYS_COMPLETION


def test_paths_are_reduced_to_file_names_and_command_lines_dropped() -> None:
    body = {
        "model_path": "/data/models/m.gguf",
        "model_alias": "m",
        "adapters": [{"id": 0, "path": "/data/lora/a.gguf"}],
        "data": [{"id": "m", "status": {"value": "loaded", "args": ["-m", "/x"], "preset": "x"}}],
        "chat_template": "{{ a/b }}",
    }
    assert json.loads(scrub_paths(json.dumps(body).encode())) == {
        "model_path": "m.gguf",
        "model_alias": "m",
        "adapters": [{"id": 0, "path": "a.gguf"}],
        "data": [{"id": "m", "status": {"value": "loaded"}}],
        "chat_template": "{{ a/b }}",
    }


def test_vertex_instances_name_routes_by_path_or_alias() -> None:
    assert vertex.alias("/v1/chat/completions") == "chatCompletions"
    assert vertex.alias("/apply-template") == "applyTemplate"
    checked = vertex.check_and_plan(
        {
            "instances": [
                {"@requestFormat": "chatCompletions", "max_tokens": 10, "model": "m"},
                {"@requestFormat": "/completion", "prompt": ["a", "b"], "n_predict": 5},
                {"@requestFormat": "tokenize", "content": "x"},
            ]
        },
        100,
        1000,
        False,
    )
    assert (checked.plan.tasks, checked.plan.tokens) == (3, 110 + 2 * 105)
    assert checked.models == ("m",) and not checked.all_admitted
    for instance in ({"@requestFormat": "slots"}, {"@requestFormat": "v1/stream"}, {}):
        with pytest.raises(Refusal):
            vertex.check_and_plan({"instances": [instance]}, 10, 1000, False)


def test_every_admitted_route_is_planned_by_its_own_format() -> None:
    for path in ROUTES:
        for route in ROUTES.by_path[path].values():
            if route.admitted:
                assert route.form not in (Form.JSON, Form.NONE), route
