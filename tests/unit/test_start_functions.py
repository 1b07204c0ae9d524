"""scripts/start.sh's functions, sourced one by one (main does not run): no processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_gateway.config import Config, ConfigError, detect_data_dir, detect_platform
from support.procs import ROOT

START = ROOT / "scripts" / "start.sh"


def sourced(snippet: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``snippet`` in bash after sourcing start.sh (main does not run)."""
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", "-c", f'source "{START}"; {snippet}'],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "dirs, env, expected",
    [
        pytest.param([], {}, "/data", id="nothing-means-data-as-on-vast"),
        pytest.param(["workspace"], {}, "/workspace", id="runpod-pod-workspace"),
        pytest.param(["runpod-volume", "workspace"], {}, "/runpod-volume", id="serverless-volume"),
        pytest.param(["workspace"], {"DATA_DIR": "/explicit"}, "/explicit", id="explicit-wins"),
    ],
)
def test_data_dir_detection(
    tmp_path: Path, dirs: list[str], env: dict[str, str], expected: str
) -> None:
    for name in dirs:
        (tmp_path / name).mkdir()
    prefix = "" if expected == "/explicit" else str(tmp_path)
    assert str(detect_data_dir(env, root=tmp_path)) == prefix + expected


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RUNPOD_ENDPOINT_ID": "e1", "RUNPOD_POD_ID": "w1"}, "runpod-serverless"),
        ({"RUNPOD_ENDPOINT_ID": "e1"}, "runpod-serverless"),  # no volume, no pod id
        ({"RUNPOD_POD_ID": "p1", "RUNPOD_GPU_COUNT": "1"}, "runpod-pod"),
        ({"VAST_CONTAINERLABEL": "C.38250"}, "vastai"),
        ({"CONTAINER_ID": "38250", "VAST_TCP_PORT_8000": "41234"}, "vastai"),
        ({"CONTAINER_ID": "abc"}, "local"),  # Docker alone sets no VAST_*
        ({}, "local"),
    ],
)
def test_platform_detection_uses_the_documented_variables(
    env: dict[str, str], expected: str
) -> None:
    assert detect_platform(env) == expected


def test_check_reports_the_facts_the_boot_block_needs(tmp_path: Path) -> None:
    (tmp_path / "api_keys.txt").write_text("a:sk-one\nb:sk-two\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gateway.py"), "--check"],
        env={"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path), "RUNPOD_ENDPOINT_ID": "e"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    facts = dict(line.split("=", 1) for line in result.stdout.split())
    assert facts == {
        "platform": "runpod-serverless",
        "data_dir": str(tmp_path),
        "auth": "on",
        "keys": "2",
        # RunPod serverless without PORT_HEALTH: its balancer probes PORT itself.
        "port_health": "8000",
    }


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RUNPOD_ENDPOINT_ID": "e", "PORT": "80"}, 80),
        ({"RUNPOD_ENDPOINT_ID": "e", "PORT": "80", "PORT_HEALTH": "8001"}, 8001),
        ({"RUNPOD_POD_ID": "p", "PORT": "80"}, 8001),
        ({}, 8001),
    ],
)
def test_unset_port_health_follows_the_platform(env: dict[str, str], expected: int) -> None:
    assert Config.from_env(env).port_health == expected


@pytest.mark.parametrize(
    "env, named",
    [
        ({"REDIS_URL": "http://cache:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://:hunter2-secret@cache:port/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://:hunter2-secret@cache:6379/db"}, "REDIS_URL"),
        ({"HEALTH_CHECK_PATH": "health"}, "HEALTH_CHECK_PATH"),
        ({"BACKENDS": "two"}, "BACKENDS"),
        ({"BACKENDS": "0"}, "BACKENDS"),
        ({"PORT": "0"}, "PORT"),
        ({"EVENT_LOOP": "trio"}, "EVENT_LOOP"),
    ],
)
def test_bad_settings_are_named_and_never_echo_a_password(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    assert named in str(caught.value) and "hunter2" not in str(caught.value)


def test_event_loop_defaults_to_auto() -> None:
    assert Config.from_env({}).event_loop == "auto"


def test_a_redis_url_is_accepted_with_password_and_db() -> None:
    assert Config.from_env({"REDIS_URL": "redis://:pw@10.0.0.5:6380/2"}).redis_url.endswith("/2")


def test_first_byte_timeout_stays_under_runpods_processing_cap() -> None:
    assert Config.from_env({"RUNPOD_ENDPOINT_ID": "e"}).first_byte_timeout < 5.5 * 60
    assert (
        Config.from_env({"RUNPOD_ENDPOINT_ID": "e", "FIRST_BYTE_TIMEOUT": "900"}).first_byte_timeout
        == 900
    )
    assert Config.from_env({}).first_byte_timeout == 600


@pytest.mark.parametrize(
    "extra, allowed",
    [
        ("--host 0.0.0.0", False),
        ("--port=9000", False),
        ("--api-key-file /tmp/k", False),
        ("-hf owner/repo", False),
        ("--models-dir /x", False),
        ("--tools all", False),
        ("--mcp-servers-json {}", False),
        ("-ag", False),
        ("--flash-attn on --jinja -ub 512", True),
        # Fetching a model, projector or draft from elsewhere, every spelling.
        ("-hfd owner/draft", False),
        ("-hfrd owner/draft", False),
        ("--hf-repo-draft owner/draft", False),
        ("--spec-draft-hf owner/draft", False),
        ("-md /x/draft.gguf", False),
        ("--model-draft /x/draft.gguf", False),
        ("--spec-draft-model /x/draft.gguf", False),
        ("-mmu https://x/p.gguf", False),
        ("--mmproj-url https://x/p.gguf", False),
        ("-dr gemma3", False),
        ("--docker-repo gemma3", False),
        ("--rpc 10.0.0.1:50052", False),
        ("-mu https://x/m.gguf", False),
        ("--model_url https://x/m.gguf", False),  # llama-server reads _ as - in long names
        ("--hf_repo owner/repo", False),
        ("--gpt-oss-20b-default", False),
        ("--fim-qwen-7b-spec", False),
        ("--mtp", False),
        ("-a other-name", False),
        # Moving the routes the gateway forwards.
        ("--api-prefix /v2", False),
        ("--api-prefix=/v2", False),
        ("--api_prefix /v2", False),
        # Generation past the slot context.
        ("--jinja --context-shift", False),
        ("--context_shift", False),
        ("--no-context-shift", True),
        # Files and tools inside the container for clients.
        ("--media-path /data", False),
        ("--tools-runtime docker:x", False),
        # A second line is read too (no word survives with a newline in it).
        ("--jinja\n--hf-repo owner/repo", False),
        ("--jinja\n-ub 512", True),
    ],
)
def test_extra_args_cannot_take_what_the_supervisor_owns(extra: str, allowed: bool) -> None:
    result = sourced("check_extra_args", {"EXTRA_ARGS": extra})
    assert (result.returncode == 0) == allowed, result.stderr
    if not allowed:
        flag = [w for w in extra.split() if w.startswith("-")][-1].split("=")[0]
        assert result.returncode == 2 and f"EXTRA_ARGS may not set {flag}:" in result.stderr


def test_context_shift_is_refused_saying_why() -> None:
    result = sourced("check_extra_args", {"EXTRA_ARGS": "--context-shift"})
    assert result.returncode == 2
    assert "past the slot's context" in result.stderr and "CTX" in result.stderr


@pytest.mark.parametrize(
    "env, named",
    [
        ({"LLAMA_ARG_HF_REPO": "owner/repo"}, "LLAMA_ARG_HF_REPO"),
        ({"LLAMA_ARG_MODEL_URL": "https://x/m.gguf"}, "LLAMA_ARG_MODEL_URL"),
        ({"LLAMA_ARG_SPEC_DRAFT_HF_REPO": "o/d"}, "LLAMA_ARG_SPEC_DRAFT_HF_REPO"),
        ({"LLAMA_ARG_SPEC_DRAFT_MODEL": "/d.gguf"}, "LLAMA_ARG_SPEC_DRAFT_MODEL"),
        ({"LLAMA_ARG_MMPROJ_URL": "https://x/p"}, "LLAMA_ARG_MMPROJ_URL"),
        ({"LLAMA_ARG_DOCKER_REPO": "gemma3"}, "LLAMA_ARG_DOCKER_REPO"),
        ({"LLAMA_ARG_RPC": "10.0.0.1:1"}, "LLAMA_ARG_RPC"),
        ({"LLAMA_ARG_API_PREFIX": "/v2"}, "LLAMA_ARG_API_PREFIX"),
        ({"LLAMA_ARG_CONTEXT_SHIFT": "1"}, "LLAMA_ARG_CONTEXT_SHIFT"),
        ({"LLAMA_ARG_CONTEXT_SHIFT": "enabled"}, "LLAMA_ARG_CONTEXT_SHIFT"),
        ({"LLAMA_ARG_TOOLS": "all"}, "LLAMA_ARG_TOOLS"),
        ({"LLAMA_ARG_AGENT": "true"}, "LLAMA_ARG_AGENT"),
        ({"LLAMA_ARG_MODELS_DIR": "/x"}, "LLAMA_ARG_MODELS_DIR"),
        ({"LLAMA_ARG_SSL_KEY_FILE": "/k"}, "LLAMA_ARG_SSL_KEY_FILE"),
        ({"LLAMA_ARG_CONTEXT_SHIFT": "0"}, None),
        ({"LLAMA_ARG_AGENT": "off"}, None),
        ({"LLAMA_ARG_NO_CONTEXT_SHIFT": "1"}, None),
        ({"LLAMA_ARG_TOOLS": "all", "ALLOW_SERVER_TOOLS": "true"}, None),
        ({"LLAMA_ARG_CTX_SIZE": "4096", "LLAMA_ARG_HOST": "0.0.0.0"}, None),  # host: scrubbed
    ],
)
def test_llama_arg_variables_follow_the_extra_args_rules(
    env: dict[str, str], named: str | None
) -> None:
    result = sourced("check_llama_env", env)
    if named is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 2 and f"{named} is set" in result.stderr
        if len(env[named]) > 4:  # the value is not echoed
            assert env[named] not in result.stderr


def test_a_newline_in_a_path_stays_inside_its_one_argument() -> None:
    result = sourced(
        "MODEL_MODE=single BACKEND_COUNT=1; MODEL_FILE=$'/m/x\n--tools\nall.gguf'; "
        "llama_args /models /run/key",
        {"PORT_BACKEND": "9999", "EXTRA_ARGS": "--jinja\n-ub 512"},
    )
    args = result.stdout.split("\0")[:-1]
    assert args[:2] == ["-m", "/m/x\n--tools\nall.gguf"]
    assert "--tools" not in args and args[-3:] == ["--jinja", "-ub", "512"]


def test_server_tools_need_an_explicit_opt_in() -> None:
    result = sourced(
        "check_extra_args", {"EXTRA_ARGS": "--tools all", "ALLOW_SERVER_TOOLS": "true"}
    )
    assert result.returncode == 0, result.stderr


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


def test_model_resolution(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    show = 'resolve_model "$1"; echo "$MODEL_MODE|$MODEL_FILE"'

    def resolve(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return sourced(f'set -- "{models}"; {show}', env)

    none = resolve()
    assert none.returncode == 2 and str(models) in none.stderr and "MODEL_PATH" in none.stderr

    touch(models / "big-00001-of-00003.gguf")
    touch(models / "big-00002-of-00003.gguf")
    touch(models / "big-00003-of-00003.gguf")
    touch(models / "mmproj-big.gguf")
    assert resolve().stdout.strip() == f"single|{models}/big-00001-of-00003.gguf"

    touch(models / "other.gguf")
    assert resolve().stdout.strip() == "router|"
    assert resolve({"MODEL_NAME": "other.gguf"}).stdout.strip() == f"single|{models}/other.gguf"
    explicit = touch(tmp_path / "elsewhere.gguf")
    assert resolve({"MODEL_PATH": str(explicit)}).stdout.strip() == f"single|{explicit}"

    missing = resolve({"MODEL_NAME": "nope.gguf"})
    assert missing.returncode == 2 and "MODEL_NAME=nope.gguf" in missing.stderr
    missing = resolve({"MODEL_PATH": "/no/such.gguf"})
    assert missing.returncode == 2 and "MODEL_PATH=/no/such.gguf" in missing.stderr


def llama_args(env: dict[str, str], backends: int = 1) -> list[str]:
    result = sourced(
        f"MODEL_MODE=single MODEL_FILE=/m.gguf BACKEND_COUNT={backends}; "
        "llama_args /models /run/key",
        {"PORT_BACKEND": "9999", **env},
    )
    assert result.returncode == 0, result.stderr
    return argv(result.stdout)


def argv(printed: str) -> list[str]:
    """llama_args's output: each argument ended by a NUL."""
    assert printed.endswith("\0") and "\n" not in printed.replace("\0", "")
    return printed.split("\0")[:-1]


def test_llama_flags_are_passed_only_when_set() -> None:
    base = llama_args({})
    assert base == [
        "-m", "/m.gguf", "--alias", "m", "--host", "127.0.0.1", "--port", "9999",
        "--api-key-file", "/run/key", "--metrics", "--slots",
    ]  # fmt: skip
    full = llama_args(
        {"NGL": "99", "CTX": "8192", "PARALLEL": "8", "EXTRA_ARGS": "--flash-attn on --jinja"}
    )
    assert full[len(base) :] == [
        "-ngl",
        "99",
        "-c",
        "8192",
        "-np",
        "8",
        "--flash-attn",
        "on",
        "--jinja",
    ]


def test_webui_false_turns_llama_servers_ui_off_too() -> None:
    assert "--no-ui" not in llama_args({}) and "--no-ui" not in llama_args({"WEBUI": "true"})
    for off in ("false", "FALSE", "0", "no", "off"):
        assert "--no-ui" in llama_args({"WEBUI": off}), off


def test_several_llama_servers_share_the_cpus_unless_threads_are_chosen() -> None:
    cpus = len(os.sched_getaffinity(0))
    share = llama_args({}, backends=2)
    assert share[share.index("--threads") + 1] == str(max(1, cpus // 2))
    assert llama_args({}, backends=64)[-1] == "1"  # never fewer than one
    assert "--threads" not in llama_args({}, backends=1)
    chosen = llama_args({"EXTRA_ARGS": "--jinja -t 3"}, backends=2)
    assert "--threads" not in chosen and chosen[-3:] == ["--jinja", "-t", "3"]
    assert "--threads" not in llama_args({"EXTRA_ARGS": "--threads=3"}, backends=2)
    assert "--threads" not in llama_args({"LLAMA_ARG_THREADS": "3"}, backends=2)


def test_models_dir_layout_flat_files_and_one_model_subdirectories(tmp_path: Path) -> None:
    models = tmp_path / "models"
    touch(models / "flat.gguf")
    touch(models / "mmproj-flat.gguf")
    touch(models / "big" / "Big-Q4_K_M-00001-of-00002.gguf")
    touch(models / "big" / "Big-Q4_K_M-00002-of-00002.gguf")
    touch(models / "big" / "mmproj-big-f16.gguf")
    (models / "empty").mkdir()
    listed = sourced(f'list_models "{models}"').stdout.split()
    assert sorted(listed) == [str(models / "big"), str(models / "flat.gguf")]
    show = 'resolve_model "$1"; echo "$MODEL_MODE|$MODEL_FILE|$MMPROJ_FILE|$(model_alias)"'
    one = sourced(f'set -- "{models}"; {show}', {"MODEL_NAME": "big"}).stdout.strip()
    shard = models / "big" / "Big-Q4_K_M-00001-of-00002.gguf"
    assert one == f"single|{shard}|{models / 'big' / 'mmproj-big-f16.gguf'}|Big-Q4_K_M"
    (models / "flat.gguf").unlink()
    only = sourced(f'set -- "{models}"; {show}').stdout.strip()
    assert only.startswith(f"single|{shard}|")  # the one model is a subdirectory
    aliased = sourced(f'set -- "{models}"; {show}', {"MODEL_ALIAS": "qwen3-8b"}).stdout
    assert aliased.strip().endswith("|qwen3-8b")


def test_router_mode_passes_the_models_dir_and_models_max() -> None:
    result = sourced("MODEL_MODE=router; llama_args /models /k", {"MODELS_MAX": "2"})
    assert argv(result.stdout)[:4] == ["--models-dir", "/models", "--models-max", "2"]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "1||"),
        ({"BACKENDS": "auto", "CUDA_VISIBLE_DEVICES": "0,1,3"}, "3|0 1 3|"),
        ({"BACKENDS": "auto", "CUDA_VISIBLE_DEVICES": ""}, "1||"),  # no GPU: one, on the CPU
        ({"BACKENDS": "2", "CUDA_VISIBLE_DEVICES": "5"}, "2|5|"),
        ({"BACKENDS": "3", "MODE": "router"}, "1||router mode runs one"),
    ],
)
def test_backends_resolve_to_one_per_gpu(env: dict[str, str], expected: str) -> None:
    mode = env.pop("MODE", "single")
    env.setdefault("PATH", "/usr/bin:/bin")  # no nvidia-smi here
    result = sourced(
        f'MODEL_MODE={mode}; resolve_backends; echo "$BACKEND_COUNT|${{GPUS[*]}}|"', env
    )
    count_gpus, _, note = expected.rpartition("|")
    assert result.stdout.strip() == count_gpus + "|", result.stderr
    assert note in result.stderr


def test_backend_ports_must_not_overlap_the_public_ones() -> None:
    result = sourced(
        "BACKEND_COUNT=3; check_port_roles",
        {"PORT": "8002", "PORT_HEALTH": "8010", "PORT_BACKEND": "8000"},
    )
    assert result.returncode == 2 and "PORT=8002" in result.stderr


def test_a_model_alias_must_be_a_plain_name() -> None:
    result = sourced("validate_settings", {"MODEL_ALIAS": "a b; rm"})
    assert result.returncode == 2 and "MODEL_ALIAS" in result.stderr


def test_router_mode_passes_the_models_dir() -> None:
    result = sourced("MODEL_MODE=router; llama_args /models /k", {"PORT_BACKEND": "1"})
    assert argv(result.stdout)[:2] == ["--models-dir", "/models"]


def test_inherited_llama_env_is_scrubbed() -> None:
    env = {
        "LLAMA_ARG_HOST": "0.0.0.0",
        "LLAMA_ARG_PORT": "80",
        "LLAMA_API_KEY": "leak",
        "LLAMA_ARG_CTX_SIZE": "4096",
    }
    result = sourced("scrub_llama_env; env | grep ^LLAMA_ || true", env)
    assert result.stdout.split() == ["LLAMA_ARG_CTX_SIZE=4096"]


@pytest.mark.parametrize(
    "env, expected",
    [
        pytest.param({}, "8000", id="default"),
        pytest.param({"AIP_MODE": "PREDICTION"}, "8080", id="vertex-default"),
        pytest.param({"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": "9000"}, "9000", id="vertex"),
        pytest.param({"AIP_HTTP_PORT": "9000"}, "8000", id="not-predicting"),
    ],
)
def test_the_gateway_listens_where_vertex_ai_sends(env: dict[str, str], expected: str) -> None:
    result = sourced("default_port", env)
    assert result.returncode == 0 and result.stdout.strip() == expected, result.stderr
