#!/usr/bin/env python3
"""Fetch MODEL_REPO from the Hugging Face Hub onto the volume; print the model's local path.

Run by the supervisor before llama-server starts (see gguf_gateway/hub.py and download.py).
Progress goes to stderr (and to GATEWAY_DOWNLOAD_FILE, which the gateway shows in /health);
the path of the model's first file is the only line on stdout. Exit status 2: the model
cannot be had as configured, and the message names the setting (MODEL_REPO, HF_TOKEN,
HF_ENDPOINT, DOWNLOAD_CONNECTIONS, DATA_DIR when it is full...).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gguf_gateway.config import detect_data_dir
from gguf_gateway.download import BadSetting, DiskFull, Settings
from gguf_gateway.hub import DEFAULT_ENDPOINT, RUNPOD_CACHE, Hub, HubError, fetch, parse_ref


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} [model] {message}", file=sys.stderr, flush=True)


def publisher(path: str) -> Callable[[dict[str, object]], None]:
    """Progress for /health: written whole and renamed, so the gateway never reads half."""
    target = Path(path)

    def publish(data: dict[str, object]) -> None:
        tmp = target.with_name(target.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, target)
        except OSError:
            pass  # progress is advisory; the download goes on

    return publish


def main() -> int:
    env = os.environ
    data_dir = detect_data_dir(env)
    cache = data_dir / "huggingface" / "hub"
    progress = env.get("GATEWAY_DOWNLOAD_FILE", "").strip()
    try:
        ref = parse_ref(env)
        endpoint = env.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
        if not endpoint.startswith(("https://", "http://")):
            raise HubError(f"HF_ENDPOINT={endpoint!r}: expected an http:// or https:// URL")
        settings = Settings.from_env(env)
        publish = publisher(progress) if progress else None
        hub = Hub(endpoint, env.get("HF_TOKEN", ""), log, settings, publish)
        wanted = ref.file or ref.quant or "default quant"
        log(
            f"model {ref.repo} ({wanted}, revision {ref.revision}) from {hub.endpoint}, cache {cache}"
        )
        # RunPod's cached models sit under the network volume; DATA_DIR is usually that volume.
        path = fetch(ref, cache, hub, [RUNPOD_CACHE, data_dir / "huggingface-cache" / "hub"])
    except (HubError, BadSetting) as exc:
        log(f"ERROR: {exc}")
        return 2
    except DiskFull as exc:
        log(f"ERROR: DATA_DIR={data_dir} is full: {exc}")
        return 2
    except OSError as exc:
        # The volume, not the Hub: a full disk while linking, a read-only or foreign mount.
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        why = "is full" if full else f"cannot be written ({exc.strerror})"
        log(f"ERROR: DATA_DIR={data_dir} {why}: {exc.filename or cache}")
        return 2
    if any(ch < " " or ch == "\x7f" for ch in str(path)):
        # The path is one line for the supervisor: a newline would split it in two.
        log(f"ERROR: the model's path {str(path)!r} holds a control character: check DATA_DIR")
        return 2
    log(f"model ready: {path}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
