"""The chart's rendered pod run against the real image (Docker), as the kubelet runs it.

Needs the built image: LLM_IMAGE names it (.ci/image-build sets it); skipped otherwise.
The pod takes its model from a stand-in Hub served in the pod's own network namespace,
paced so that the download lasts seconds: the probes are watched through it. Then a long
stream is in flight when the pod is deleted: the preStop hook, SIGTERM and the grace
period must let the drain finish it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.chart import find, render
from support.docker_pod import DockerPod
from support.make_model import write_model

IMAGE = os.environ.get("LLM_IMAGE", "")
KEY = "sk-chart-pod-key-00000000000"

pytestmark = pytest.mark.skipif(
    not IMAGE or shutil.which("docker") is None,
    reason="needs the built image in LLM_IMAGE and docker (.ci/image-build runs this)",
)

# What an operator sets, plus what makes the pod run on a CPU-only machine: no GPU, a CPU
# limit (a stream long enough to be in flight at the stop), one slot holding the whole
# context, and a drain generous for a loaded machine.
VALUES_BASE: dict[str, Any] = {
    "model": {"repo": "ci-org/tiny-GGUF:Q8_0"},
    "keys": {"existingSecret": "llm-keys"},
    "gpu": {"count": 0},
    "server": {"parallel": 1, "logFormat": "text"},
    "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "500m", "memory": "2Gi"}},
    "drainTimeout": 120,
    "preStopSleep": 2,
}
SECRETS = {"llm-keys": {"API_KEYS": f"ci:{KEY}\n"}}


@pytest.mark.parametrize("keys_as", ["file", "env"])
def test_rendered_pod_probes_and_drain_against_the_real_image(tmp_path: Path, keys_as: str) -> None:
    hub_files = tmp_path / "hub"
    write_model(hub_files / "tiny-Q8_0.gguf")
    data = tmp_path / "data"
    data.mkdir()
    values = json.loads(json.dumps(VALUES_BASE))
    values["keys"]["as"] = keys_as
    pod = DockerPod(
        IMAGE, {}, SECRETS, {"llm-llama-gguf-inference-data": data}, tmp_path
    )  # spec set below, once the Hub's address is known
    try:
        # ~8 blocks of 64 KiB at 0.6 s each: a download of about 5 s.
        values["model"]["hfEndpoint"] = pod.start_sandbox(hub_files, pace=0.6)
        objects = render(values)
        pod.pod = find(objects, "Deployment", "inference")["spec"]["template"]["spec"]
        pod.start()

        samples = watch_probes(pod)
        # Kubernetes' view through the cold start: liveness never failed once the gateway
        # answered; readiness failed while the model was fetched and loaded, then passed.
        first_live = next(i for i, (live, _) in enumerate(samples) if live)
        assert all(live for live, _ in samples[first_live:]), samples
        not_ready = [i for i, (live, ready) in enumerate(samples) if live and not ready]
        assert len(not_ready) >= 3, f"readiness never seen failing while loading: {samples}"
        assert samples[-1] == (True, True)
        assert pod.probe("startup")
        assert "platform:      local" in pod.logs()

        stream_through_termination(pod)
        assert KEY not in pod.logs()
    finally:
        pod.remove()


def watch_probes(pod: DockerPod) -> list[tuple[bool, bool]]:
    """(liveness, readiness) every 0.25 s until ready (5 minutes at most)."""
    samples: list[tuple[bool, bool]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert pod.running(), f"the server container exited:\n{pod.logs()[-3000:]}"
        sample = (pod.probe("liveness"), pod.probe("readiness"))
        samples.append(sample)
        if sample == (True, True):
            return samples
        time.sleep(0.25)
    raise AssertionError(f"not ready in 5 minutes:\n{pod.logs()[-3000:]}")


def stream_through_termination(pod: DockerPod) -> None:
    """A long stream is in flight when the pod is deleted; it must end whole, and the pod
    exit 0 within its grace period."""
    body = {
        "model": "tiny-Q8_0",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3900,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first_event = threading.Event()
    outcome: dict[str, Any] = {}

    def read() -> None:
        events, done, usage = 0, False, ""
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{pod.port}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=300,
        ) as reply:
            outcome["status"] = reply.status_code
            for line in reply.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    events += 1
                    first_event.set()
                    if '"completion_tokens"' in line:
                        usage = line
        outcome.update(events=events, done=done, usage=usage)
        first_event.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first_event.wait(120), "the stream never started"
    code, taken = pod.terminate()
    reader.join(300)
    logs = pod.logs()
    grace = int(pod.pod["terminationGracePeriodSeconds"])
    assert outcome.get("status") == 200, outcome
    assert outcome["done"], f"the stream was cut: {outcome}\n{logs[-3000:]}"
    assert '"completion_tokens":3900' in outcome["usage"], outcome
    assert "draining: waiting up to" in logs, "the stream had ended before SIGTERM"
    assert "drain timeout" not in logs
    assert code == 0, f"exit {code}\n{logs[-3000:]}"
    assert taken < grace, f"termination took {taken:.1f}s of a {grace}s grace period"
