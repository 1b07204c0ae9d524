"""Which paths are the web UI's files, WEBUI's setting, and llama-server's merged series."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gguf_gateway.config import Config, ConfigError
from gguf_gateway.metrics import merge_backend_series
from gguf_gateway.routes import ROUTES
from gguf_gateway.webui import is_ui_path


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/index.html",
        "/_app/version.json",
        "/_app/immutable/entry/start.B1x-9_ab.js",
        "/_app/immutable/assets/0.DfX2.css",
        "/favicon.ico",
        "/manifest.webmanifest",
        "/sw.js",
        "/build.json",
        "/apple-touch-icon-180x180.png",
        "/recommended-mcp/github-dark.png",
        "/workbox-b3c04f83.js",
    ],
)
def test_ui_files_are_recognised(path: str) -> None:
    assert is_ui_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/props",
        "/slots",
        "/metrics",
        "/v1/models",
        "/_app",  # a directory, not a file
        "/_app/../props",
        "/_app/.hidden",
        "/.env",
        "/../etc/passwd.txt",
        "/_app/%2e%2e/props",
        "/a/.b.js",
        "/v1/models.gguf",
        "/index.html/",
        "/binary.exe",
        "//index.html",
    ],
)
def test_api_paths_and_odd_paths_are_not_ui_files(path: str) -> None:
    assert not is_ui_path(path)


def test_no_api_route_looks_like_a_ui_file() -> None:
    # The UI's class is recognised by shape: no route of the table may match it, or it
    # would be served without a key.
    assert [path for path in ROUTES if is_ui_path(path)] == []


def test_webui_defaults_on_and_is_checked() -> None:
    assert Config.from_env({}).webui is True
    assert Config.from_env({"WEBUI": "false"}).webui is False
    with pytest.raises(ConfigError, match="WEBUI"):
        Config.from_env({"WEBUI": "maybe"})


BACKEND_0 = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 10
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:spec_decode_num_accepted_tokens_per_pos_total Accepted per position.
# TYPE llamacpp:spec_decode_num_accepted_tokens_per_pos_total counter
llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 3
# HELP other_series Not llama.cpp's.
# TYPE other_series gauge
other_series 7
"""
BACKEND_1 = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 32
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"""


def test_backend_series_are_labelled_and_each_family_appears_once() -> None:
    text = merge_backend_series([(0, BACKEND_0), (1, BACKEND_1)], labelled=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    prompt = families["llamacpp:prompt_tokens"]
    assert prompt.type == "counter"
    assert {(s.labels["backend"], s.value) for s in prompt.samples} == {("0", 10), ("1", 32)}
    per_pos = families["llamacpp:spec_decode_num_accepted_tokens_per_pos"].samples
    assert [s.labels for s in per_pos] == [{"backend": "0", "position": "0"}]
    assert "other_series" not in families
    assert text.count("# TYPE llamacpp:requests_processing gauge") == 1


def test_one_backends_series_pass_as_llama_server_writes_them() -> None:
    text = merge_backend_series([(0, BACKEND_0)], labelled=False)
    assert text == BACKEND_0.split("# HELP other_series")[0]


def test_no_backend_series_gives_nothing() -> None:
    assert merge_backend_series([], labelled=True) == ""
    assert merge_backend_series([(0, "# HELP x y\n# TYPE x gauge\nx 1\n")], labelled=False) == ""
