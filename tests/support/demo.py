"""`make run`: the whole stack locally, with a demo model and key when none is given.

Uses DATA_DIR (default ./.data). With no MODEL_PATH/MODEL_NAME and no .gguf in
DATA_DIR/models it writes a tiny random-weights demo model there; with no key configured
it writes a demo key to DATA_DIR/api_keys.txt. Then it runs scripts/start.sh, waits until
the gateway is ready, prints how to call it, and stays in the foreground (Ctrl-C drains).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.make_model import write_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def ensure_model(env: dict[str, str], models_dir: Path) -> None:
    if env.get("MODEL_PATH") or env.get("MODEL_NAME") or list(models_dir.glob("*.gguf")):
        return
    path = models_dir / "demo-tiny.gguf"
    write_model(path)
    print(
        f"demo: wrote {path} (random weights: its text is noise; put a real .gguf in {models_dir})"
    )


def ensure_key(env: dict[str, str], keys_file: Path) -> str | None:
    """The key to show in the examples: a new demo key, or None if keys already exist."""
    if env.get("AUTH_ENABLED", "true").lower() in ("false", "0", "no", "off"):
        return ""
    if env.get("API_KEY"):
        return env["API_KEY"]
    if keys_file.exists() and keys_file.read_text().strip():
        return None
    secret = "sk-demo-" + secrets.token_urlsafe(24)
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# demo key written by `make run`; manage keys with scripts/key_mgmt.py\n")
        handle.write(f"demo:{secret}\n")
    print(f"demo: wrote a demo key to {keys_file}")
    return secret


def ready(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> int:
    env = dict(os.environ)
    data_dir = Path(env.setdefault("DATA_DIR", str(ROOT / ".data")))
    models_dir = Path(env.get("MODELS_DIR", data_dir / "models"))
    models_dir.mkdir(parents=True, exist_ok=True)
    keys_file = Path(env.get("AUTH_KEYS_FILE", data_dir / "api_keys.txt"))
    env.setdefault("LLAMA_SERVER_BIN", str(ROOT / ".venv" / "bin" / "llama-server"))
    port = env.setdefault("PORT", "8000")

    ensure_model(env, models_dir)
    key = ensure_key(env, keys_file)

    child = subprocess.Popen(["bash", str(ROOT / "scripts" / "start.sh")], env=env)
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        while child.poll() is None and not ready(port):
            time.sleep(0.2)
        if child.poll() is None:
            shown = key if key else "<a key from " + str(keys_file) + ">"
            auth = f'-H "Authorization: Bearer {shown}" ' if key != "" else ""
            print(
                f"""
================ ready on http://localhost:{port} ================
curl -N http://localhost:{port}/v1/chat/completions {auth}\\
  -H "Content-Type: application/json" \\
  -d '{{"messages":[{{"role":"user","content":"Hello"}}],"max_tokens":32,"stream":true}}'

python3 -c '
from openai import OpenAI
client = OpenAI(base_url="http://localhost:{port}/v1", api_key="{shown or "none"}")
print(client.chat.completions.create(model="any", max_tokens=32,
      messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'
===================================================================
Ctrl-C stops (drains in-flight requests first).""",
                flush=True,
            )
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)
        return child.wait()


if __name__ == "__main__":
    sys.exit(main())
