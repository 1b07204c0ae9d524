""".env.example lists every variable the code reads."""

from __future__ import annotations

import re

from support.procs import ROOT

PY_READS = [
    re.compile(r"""environ(?:\.get)?\(?\[?\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""\benv\.get\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""\b_\w+\(\s*env,\s*["']([A-Z][A-Z0-9_]+)["']"""),
]
SH_READS = [
    re.compile(r"\$\{([A-Z][A-Z0-9_]+)"),
    re.compile(r"\b(?:require_uint|check_port|for name in)\s+([A-Z][A-Z0-9_]+)"),
]
# Standard process environment, not configuration.
NOT_CONFIG = {"PATH", "HOME", "PWD", "PYTHONPATH", "SECONDS", "EPOCHREALTIME", "BASH_SOURCE"}
# llama-server's own settings, which reach it unchanged: an empty one in an env file would
# reach it too, so the example names them in comments only.
LLAMA_SERVER_OWN = {"LLAMA_ARG_THREADS"}


def variables_read() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "scripts").rglob("*.py"):
        text = path.read_text()
        for pattern in PY_READS:
            found.update(pattern.findall(text))
    for path in (ROOT / "scripts").glob("*.sh"):
        text = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
        )
        for pattern in SH_READS:
            found.update(pattern.findall(text))
        found -= internal_state(text)
    return found - NOT_CONFIG - LLAMA_SERVER_OWN


def internal_state(script: str) -> set[str]:
    """Variables a script sets up itself at top level (NAME=... not reading ${NAME})."""
    return {
        name
        for name, value in re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", script, re.M)
        if "${" + name not in value
    }


def test_every_variable_the_code_reads_is_in_env_example() -> None:
    listed = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    read = variables_read()
    assert {"PORT", "MAX_QUEUE_SIZE", "MODEL_NAME", "STREAM_IDLE_TIMEOUT"} <= read  # the scan works
    assert read - listed == set()


def test_llama_servers_own_settings_are_named_in_comments() -> None:
    text = (ROOT / ".env.example").read_text()
    for name in LLAMA_SERVER_OWN:
        assert name in text and not re.search(rf"^{name}=", text, re.M)


def test_env_example_defaults_match_the_gateway_defaults() -> None:
    from gguf_gateway.config import Config

    listed = dict(
        re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", (ROOT / ".env.example").read_text(), re.M)
    )
    # The example's values are valid settings, and equal the built-in defaults.
    assert Config.from_env({k: v for k, v in listed.items() if v}) == Config.from_env({})
    defaults = Config.from_env({})
    assert int(listed["PORT"]) == defaults.port
    assert float(listed["DRAIN_TIMEOUT"]) == defaults.drain_timeout
    assert float(listed["STREAM_IDLE_TIMEOUT"]) == defaults.stream_idle_timeout
    assert int(listed["MAX_REQUEST_BODY_SIZE"]) == defaults.max_request_body_size
