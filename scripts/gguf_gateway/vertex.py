"""Vertex AI's prediction protocol, as llama-server serves it (AIP_MODE=PREDICTION).

One request carries up to 128 ``instances``; each names the route it is for in
``@requestFormat`` (the route's path, or its camelCase alias: ``chatCompletions`` for
``/v1/chat/completions``), and llama-server runs them all at once, each as a
non-streaming request to that route. So each instance is checked and planned here as the
request it stands for: a route an inference key may send (never an admin, stateful or
disabled one), its body through the same checks, its tokens and slots by the route's own
format, summed over the instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import bodies, tokens
from .refusals import bad_request
from .routes import ROUTES, Cost, Form, Route

# llama-server's own bound.
MAX_INSTANCES = 128
# What an instance may stand for: requests an inference key may send that act on nothing
# of anyone else's.
_ALLOWED = frozenset({Cost.GENERATE, Cost.INPUT, Cost.FREE})


def alias(path: str) -> str:
    """llama-server's camelCase name for a route (server-http.cpp, path_to_gcp_format)."""
    name = path[3:] if path.startswith("/v1") and len(path) > 3 else path
    name = name.removeprefix("/")
    out: list[str] = []
    cap = False
    for char in name:
        if char == ":":
            break
        if char in "/-_":
            cap = True
        else:
            out.append(char.upper() if cap else char)
            cap = False
    return "".join(out)


def _routes_for(request_format: str) -> list[Route]:
    """Every POST route the format may name (an alias can stand for several paths, and
    llama-server takes whichever it registered first)."""
    found: list[Route] = []
    for path in ROUTES:
        route = ROUTES.route(path, "POST")
        if route is not None and (path == request_format or alias(path) == request_format):
            found.append(route)
    return found


@dataclass(frozen=True, slots=True)
class Checked:
    plan: tokens.Plan  # every instance's tasks and tokens, summed
    models: tuple[str, ...]  # the models the instances name
    all_admitted: bool  # every instance takes a slot (none a free route's)


def check_and_plan(
    payload: dict[str, Any], body_bytes: int, slot_ctx: int, allow_remote_media: bool
) -> Checked:
    """Refuse an instance that is not a request an inference key may send; plan the rest."""
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise bad_request("'instances' must be a non-empty list", param="instances")
    if len(instances) > MAX_INSTANCES:
        raise bad_request(f"at most {MAX_INSTANCES} instances", param="instances")
    tasks = total = 0
    models: list[str] = []
    all_admitted = True
    for index, instance in enumerate(instances):
        where = f"instances[{index}]"
        if not isinstance(instance, dict):
            raise bad_request(f"{where} must be a JSON object", param=where)
        request_format = instance.get("@requestFormat")
        routes = _routes_for(request_format) if isinstance(request_format, str) else []
        if not routes or any(
            r.scope != "inference" or r.cost not in _ALLOWED or r.form is Form.VERTEX
            for r in routes
        ):
            raise bad_request(
                f"{where}: '@requestFormat' must name a route an inference key may call",
                param=f"{where}.@requestFormat",
            )
        bodies.inspect(instance, allow_remote_media)
        tokens.strip_server_fields(instance)
        if isinstance(instance.get("model"), str):
            models.append(instance["model"])
        all_admitted = all_admitted and all(r.admitted for r in routes)
        plans = [tokens.plan(r.form, instance, body_bytes, slot_ctx) for r in routes if r.admitted]
        if plans:
            tasks += max(p.tasks for p in plans)
            total += max(p.tokens for p in plans)
    return Checked(tokens.Plan(max(tasks, 1), total), tuple(models), all_admitted)
