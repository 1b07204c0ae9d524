"""llama.cpp's web UI through the gateway, against a real llama-server serving the real UI.

The UI is built with npm from the pinned sdist (tests/support/llama_sdist.py) and served by
``llama-server --path`` (the CPU build has no UI built in). Its files need no key through
the gateway and arrive as llama-server sends them; the API behind it needs a key, which the
browser test types into the UI's own prompt before chatting, in Debian's chromium.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ALICE, BACKEND_KEY, Backend, GatewayHandle, gateway_env
from support.llama_sdist import Unavailable, webui_dir
from support.procs import start_gateway, start_llama_server, wait_until

# The response headers a browser's cache and loader act on (Date and Server aside).
MATTERS = (
    "content-type",
    "content-encoding",
    "etag",
    "last-modified",
    "cache-control",
    "cross-origin-embedder-policy",
    "cross-origin-opener-policy",
)


def fetch(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def ui_files() -> Path:
    try:
        return webui_dir()
    except Unavailable as exc:
        pytest.skip(f"llama.cpp's web UI cannot be built here: {exc}")


@pytest.fixture(scope="module")
def ui_backend(
    model_file: Path, ui_files: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    log = tmp_path_factory.mktemp("ui-logs") / "llama-server.log"
    proc, port = start_llama_server(
        model_file,
        log,
        api_key=BACKEND_KEY,
        parallel=2,
        ctx_per_slot=1024,
        # A random model rarely stops by itself: the UI sends no max_tokens.
        extra=["--path", str(ui_files), "-n", "24"],
    )
    try:
        yield Backend(proc, port, BACKEND_KEY, model_file)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def ui_gateway(
    ui_backend: Backend, keys_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayHandle]:
    logs = tmp_path_factory.mktemp("ui-gateway")
    env = gateway_env(ui_backend.port, keys_file)
    env["LOG_DIR"] = str(logs)
    proc, port = start_gateway(env, logs / "gateway.log")
    try:
        yield GatewayHandle(proc, port, ui_backend)
    finally:
        proc.stop()


def ui_paths(ui_files: Path) -> list[str]:
    """/, index.html, the hashed bundle and stylesheet, and files from around the tree."""
    bundle = next(ui_files.glob("_app/immutable/bundle.*.js"))
    css = next(ui_files.glob("_app/immutable/assets/*.css"))
    icon = next(ui_files.glob("recommended-mcp/*.png"))
    paths = ["/", "/index.html", "/_app/version.json", "/favicon.ico", "/manifest.webmanifest"]
    return paths + ["/" + str(p.relative_to(ui_files)) for p in (bundle, css, icon)]


def test_ui_files_need_no_key_and_arrive_as_llama_server_sends_them(
    ui_gateway: GatewayHandle, ui_files: Path
) -> None:
    backend_auth = {"Authorization": f"Bearer {BACKEND_KEY}"}
    for path in ui_paths(ui_files):
        # Direct, llama-server wants its key for every file but "/" (--path with --api-key).
        want_status, want_headers, want_body = fetch(
            ui_gateway.backend.port, "GET", path, backend_auth
        )
        status, headers, body = fetch(ui_gateway.port, "GET", path)
        assert (status, len(body)) == (want_status, len(want_body)) == (200, len(body)), path
        assert body == want_body, path
        for name in MATTERS:
            assert headers.get(name) == want_headers.get(name), (path, name)
        assert "x-request-id" in headers and headers["x-content-type-options"] == "nosniff"
    # The bundle is the page's code: check it really is the build's.
    bundle = ui_paths(ui_files)[-3]
    assert fetch(ui_gateway.port, "GET", bundle)[2] == (ui_files / bundle[1:]).read_bytes()


def test_ui_revalidates_with_304_and_answers_head(
    ui_gateway: GatewayHandle, ui_files: Path
) -> None:
    path = ui_paths(ui_files)[-3]
    status, headers, body = fetch(ui_gateway.port, "GET", path)
    etag = headers["etag"]
    assert status == 200 and etag
    status, headers304, body304 = fetch(ui_gateway.port, "GET", path, {"If-None-Match": etag})
    assert (status, body304, headers304["etag"]) == (304, b"", etag)
    status, head_headers, head_body = fetch(ui_gateway.port, "HEAD", path)
    assert (status, head_body, head_headers["content-length"]) == (200, b"", str(len(body)))
    assert head_headers["etag"] == etag
    # The same connection goes on serving after a 304 and a HEAD (nothing left unread).
    conn = http.client.HTTPConnection("127.0.0.1", ui_gateway.port, timeout=30)
    try:
        for extra in ({"If-None-Match": etag}, {}, {"If-None-Match": etag}):
            conn.request("GET", path, headers=extra)
            response = conn.getresponse()
            assert response.status == (304 if extra else 200)
            assert len(response.read()) == (0 if extra else len(body))
    finally:
        conn.close()


def test_ui_bytes_are_never_recompressed(ui_gateway: GatewayHandle, ui_files: Path) -> None:
    path = ui_paths(ui_files)[-3]
    gzip = {"Accept-Encoding": "gzip, deflate, br"}
    direct = fetch(
        ui_gateway.backend.port, "GET", path, {**gzip, "Authorization": f"Bearer {BACKEND_KEY}"}
    )
    through = fetch(ui_gateway.port, "GET", path, gzip)
    assert through[1].get("content-encoding") == direct[1].get("content-encoding")
    assert through[2] == direct[2]


def test_api_behind_the_ui_needs_a_key(ui_gateway: GatewayHandle) -> None:
    # The UI shows its "Enter API Key" prompt on a 401 (or 403) from GET /props.
    status, headers, body = fetch(
        ui_gateway.port, "GET", "/props", {"Content-Type": "application/json"}
    )
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    # The shape llama-server's own 401 has (the UI reads only the status).
    assert json.loads(body)["error"]["type"] == "authentication_error"
    for path in ("/v1/models", "/slots"):
        assert fetch(ui_gateway.port, "GET", path)[0] == 401
    status, _, body = fetch(ui_gateway.port, "GET", "/props", {"Authorization": f"Bearer {ALICE}"})
    assert status == 200, body
    # Paths that only look like files outside the UI's shape are not forwarded.
    for path in ("/_app/../props", "/.env", "/_app/%2e%2e/props", "/props.gguf"):
        assert fetch(ui_gateway.port, "GET", path)[0] == 404, path
    # Files take no body and no other method.
    assert fetch(ui_gateway.port, "POST", "/index.html")[0] == 405


def test_webui_false_makes_the_ui_404(ui_backend: Backend, keys_file: Path, tmp_path: Path) -> None:
    env = gateway_env(ui_backend.port, keys_file)
    env["WEBUI"] = "false"
    proc, port = start_gateway(env, tmp_path / "gateway.log")
    try:
        for path in ("/", "/index.html", "/_app/version.json", "/favicon.ico"):
            assert fetch(port, "GET", path)[0] == 404, path
        assert fetch(port, "GET", "/v1/models", {"Authorization": f"Bearer {ALICE}"})[0] == 200
    finally:
        proc.stop()


# ------------------------------------------------------------------ the UI built in

# A llama-server with the UI compiled in, as in llama.cpp's CUDA server image (the CPU build
# from PyPI has none): built from the same sdist with the UI's dist/ in tools/ui.
EMBEDDED_UI_BIN = os.environ.get("LLAMA_SERVER_UI_BIN", "")


@pytest.mark.skipif(
    not EMBEDDED_UI_BIN,
    reason="LLAMA_SERVER_UI_BIN names no llama-server with the UI built in "
    "(cmake with tools/ui/dist present; the CPU build from PyPI has none)",
)
def test_built_in_ui_keeps_gzip_isolation_and_caching_headers(
    model_file: Path,
    keys_file: Path,
    ui_files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLAMA_SERVER_BIN", EMBEDDED_UI_BIN)
    backend, backend_port = start_llama_server(
        model_file, tmp_path / "llama-server.log", api_key=BACKEND_KEY, parallel=1
    )
    try:
        proc, port = start_gateway(gateway_env(backend_port, keys_file), tmp_path / "gateway.log")
        try:
            gzip = {"Accept-Encoding": "gzip, deflate, br"}
            for path in ui_paths(ui_files) + ["/sw.js", "/build.json"]:
                # Built in, llama-server serves its files without a key, gzip-compressed.
                want = fetch(backend_port, "GET", path, gzip)
                got = fetch(port, "GET", path, gzip)
                assert (got[0], got[2]) == (want[0], want[2]) and got[0] == 200, path
                for name in MATTERS:
                    assert got[1].get(name) == want[1].get(name), (path, name)
                assert got[1]["content-encoding"] == "gzip", path
                etag = want[1].get("etag")
                if etag:  # sw.js, build.json: no-cache and no validator
                    revalidated = fetch(port, "GET", path, {**gzip, "If-None-Match": etag})
                    assert (revalidated[0], revalidated[2]) == (304, b""), path
            index = fetch(port, "GET", "/", gzip)[1]
            assert index["cross-origin-opener-policy"] == "same-origin"
            assert index["cross-origin-embedder-policy"] == "require-corp"
            assert index["cache-control"] == "no-cache"
            bundle = fetch(port, "GET", ui_paths(ui_files)[-3], gzip)[1]
            assert bundle["cache-control"] == "public, max-age=31536000, immutable"
            # A client that takes no gzip gets llama-server's own answer (415), not bytes
            # the gateway decompressed or compressed itself.
            assert fetch(port, "GET", "/", {})[0] == fetch(backend_port, "GET", "/", {})[0] == 415
        finally:
            proc.stop()
    finally:
        backend.stop()


# ------------------------------------------------------------------ a real browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def screenshots_dir(tmp_path: Path) -> Path:
    """Where the browser test's screenshots go: TEST_ARTIFACTS_DIR, else pytest's tmp."""
    root = os.environ.get("TEST_ARTIFACTS_DIR")
    path = Path(root) / "webui" if root else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_browser_enters_a_key_in_the_ui_and_gets_a_streamed_reply(
    ui_gateway: GatewayHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    # Selenium's driver manager must never reach the network for a driver.
    monkeypatch.setenv("SE_OFFLINE", "true")
    shots = screenshots_dir(tmp_path)
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    # The browser's network log: to see the chat's reply arrive as an event stream.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    # Generous: two shared cores, a 10 MB bundle to parse, a model to run.
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(ui_gateway.url + "/")
        prompt = wait.until(
            ec.element_to_be_clickable((By.XPATH, "//button[contains(., 'Enter API Key')]"))
        )
        driver.save_screenshot(str(shots / "1-key-prompt.png"))
        prompt.click()
        field = wait.until(ec.visibility_of_element_located((By.ID, "api-key-input")))
        field.send_keys(ALICE)
        driver.find_element(By.XPATH, "//button[contains(., 'Save & Retry')]").click()
        box = wait.until(ec.element_to_be_clickable((By.TAG_NAME, "textarea")))
        driver.save_screenshot(str(shots / "2-chat.png"))
        box.send_keys("Hello there")
        box.send_keys(Keys.ENTER)

        def replied(d: object) -> bool:
            found = driver.find_elements(
                By.CSS_SELECTOR, '[aria-label="Assistant message with actions"]'
            )
            return any(el.text.strip() for el in found)

        wait.until(replied)
        driver.save_screenshot(str(shots / "3-reply.png"))
        answers: dict[str, list[dict[str, Any]]] = {}
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.responseReceived":
                response = message["params"]["response"]
                answers.setdefault(response["url"].split("?")[0], []).append(response)
    except Exception:
        driver.save_screenshot(str(shots / "failed.png"))
        raise
    finally:
        driver.quit()
    # The page asked /props without a key first (the 401 that brought up the prompt), and
    # the chat's reply came as an event stream.
    props = answers[ui_gateway.url + "/props"]
    assert props[0]["status"] == 401 and any(r["status"] == 200 for r in props)
    chat = answers[ui_gateway.url + "/v1/chat/completions"]
    assert [(r["status"], r["mimeType"]) for r in chat] == [(200, "text/event-stream")]
    # It came through the gateway under the key typed into the UI.
    ledger = Path(ui_gateway_log_dir(ui_gateway)) / "usage.jsonl"
    wait_until(lambda: ledger.exists() and "chat/completions" in ledger.read_text(), 10, "ledger")
    chats = [
        json.loads(line)
        for line in ledger.read_text().splitlines()
        if '"/v1/chat/completions"' in line
    ]
    assert any(
        c["key_id"] == "alice" and c["status"] == 200 and c["completion_tokens"] for c in chats
    ), chats
    print(f"screenshots: {shots}")


def ui_gateway_log_dir(gw: GatewayHandle) -> str:
    return gw.proc.env["LOG_DIR"]
