"""`make run`'s demo: from an empty data directory to a working, authenticated endpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai

from support.procs import ROOT, free_port, llama_server_bin


def test_demo_makes_a_model_and_a_key_and_prints_a_working_call(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "DATA_DIR": str(tmp_path / "data"),
        "PORT": str(port),
        "PORT_HEALTH": str(free_port()),
        "PORT_BACKEND": str(free_port()),
        "LLAMA_SERVER_BIN": llama_server_bin(),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "support" / "demo.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    ready = threading.Event()

    def collect() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if "Ctrl-C stops" in line:
                ready.set()

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "".join(output)[-3000:]
        text = "".join(output)
        key = re.search(r'api_key="(sk-demo-[^"]+)"', text)
        assert key is not None and f"http://localhost:{port}/v1/chat/completions" in text
        assert (tmp_path / "data" / "models" / "demo-tiny.gguf").exists()
        assert oct((tmp_path / "data" / "api_keys.txt").stat().st_mode & 0o777) == "0o600"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key.group(1), max_retries=0
        )
        reply = client.chat.completions.create(
            model="any", max_tokens=8, messages=[{"role": "user", "content": "Hello"}]
        )
        assert reply.choices[0].message.role == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = proc.wait(30)
        reader.join(5)
    assert code == 0, "".join(output)[-2000:]
