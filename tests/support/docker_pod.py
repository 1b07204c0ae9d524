"""A rendered Kubernetes pod run with Docker, as the kubelet would run it, without a cluster.

A pod is containers sharing one network namespace: a sandbox container holds it (here it
also serves the stand-in Hugging Face Hub on the pod's loopback, like a sidecar) and
publishes the pod's port to the host; the server container joins it. The container's
env (secretKeyRef resolved from the Secrets given), args, securityContext (user, group,
fsGroup, read-only root, dropped capabilities, no privilege escalation), volumes (claims
as host folders owned by fsGroup, emptyDirs as tmpfs, Secrets as read-only files with
their mode), resource limits (CPU, memory), the preStop hook and the grace period are
translated one to one; probes are judged by Kubernetes' rule (2xx and 3xx succeed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Manifest = dict[str, Any]


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout


def probe_ok(port: int, probe: Manifest) -> bool:
    """An httpGet probe as the kubelet runs it: any 200-399 succeeds; no answer fails."""
    get = probe["httpGet"]
    assert get["port"] == "http", get  # the pod's one named port, published as `port`
    url = f"http://127.0.0.1:{port}{get['path']}"
    try:
        with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1)) as reply:
            return 200 <= int(reply.status) < 400
    except urllib.error.HTTPError as exc:
        return 200 <= exc.code < 400
    except OSError:
        return False


def _bytes(quantity: str) -> str:
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert match, f"memory quantity {quantity!r}"
    return match.group(1) + units[match.group(2)]


def _cpus(quantity: str | int) -> str:
    text = str(quantity)
    return str(int(text[:-1]) / 1000) if text.endswith("m") else text


@dataclass
class DockerPod:
    image: str
    pod: Manifest  # the Deployment's spec.template.spec
    secrets: dict[str, dict[str, str]]
    claims: dict[str, Path]  # claim name -> host folder
    work: Path
    name: str = field(default_factory=lambda: f"chart-pod-{os.getpid()}-{time.monotonic_ns()}")
    port: int = 0

    @property
    def container(self) -> Manifest:
        container: Manifest = self.pod["containers"][0]
        return container

    @property
    def server(self) -> str:
        return f"{self.name}-server"

    def start_sandbox(self, hub_files: Path, pace: float) -> str:
        """The pod's network namespace, serving the stand-in Hub on its loopback; returns
        the Hub's URL as the pod sees it."""
        code = (
            "import sys, signal\n"
            "sys.path.insert(0, '/opt/hub')\n"
            "from pathlib import Path\n"
            "from support.fake_hub import FakeHub, HubRepo\n"
            "files = {p.name: p.read_bytes() for p in Path('/hub').glob('*.gguf')}\n"
            f"hub = FakeHub({{'ci-org/tiny-GGUF': HubRepo(files)}}, pace={pace}).start()\n"
            "print(hub.url, flush=True)\n"
            "signal.sigwait({signal.SIGTERM})\n"
        )
        support = Path(__file__).resolve().parent
        docker(
            "run", "-d", "--name", self.name, "-p", "127.0.0.1::8000",
            "-v", f"{support}:/opt/hub/support:ro", "-v", f"{hub_files}:/hub:ro",
            "--user", "65534:65534", "--entrypoint", "python3", self.image, "-c", code,
        )  # fmt: skip
        published = docker("port", self.name, "8000/tcp").split()[0]
        self.port = int(published.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            logs = docker("logs", self.name)
            if logs.strip():
                return logs.split()[0]
            time.sleep(0.2)
        raise AssertionError("the Hub sidecar did not start")

    def run_args(self) -> list[str]:
        """`docker run` arguments for the server container, from the pod spec."""
        pod, container = self.pod, self.container
        args = ["--name", self.server, "--network", f"container:{self.name}"]
        pod_security = pod.get("securityContext", {})
        security = {**pod_security, **container.get("securityContext", {})}
        if "runAsUser" in security:
            user = f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"
            args += ["--user", user]
        if security.get("runAsNonRoot"):
            assert security.get("runAsUser", 0) != 0, "runAsNonRoot with root"
        if "fsGroup" in pod_security:
            args += ["--group-add", str(pod_security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        for cap in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        limits = container.get("resources", {}).get("limits", {})
        assert not any("gpu" in name for name in limits), "a GPU limit on a CPU machine"
        if "memory" in limits:
            args += ["--memory", _bytes(limits["memory"])]
        if "cpu" in limits:
            args += ["--cpus", _cpus(limits["cpu"])]
        for item in container.get("env", []):
            args += ["-e", f"{item['name']}={self._env_value(item)}"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            args += self._mount(volumes[mount["name"]], mount, pod_security.get("fsGroup"))
        if "command" in container:
            args += ["--entrypoint", container["command"][0]]
        args.append(self.image)
        if "command" in container:
            args += container["command"][1:]
        args += container.get("args", [])
        return args

    def _env_value(self, item: Manifest) -> str:
        if "value" in item:
            return str(item["value"])
        ref = item["valueFrom"]["secretKeyRef"]
        return self.secrets[ref["name"]][ref["key"]]

    def _mount(self, volume: Manifest, mount: Manifest, fs_group: int | None) -> list[str]:
        target = mount["mountPath"]
        if "emptyDir" in volume:
            if target == "/dev/shm":
                size = volume["emptyDir"].get("sizeLimit", "64Mi")
                return ["--shm-size", _bytes(size)]
            return ["--tmpfs", f"{target}:rw,mode=1777"]
        if "persistentVolumeClaim" in volume:
            host = self.claims[volume["persistentVolumeClaim"]["claimName"]]
            if fs_group is not None:
                # The kubelet makes a volume group-owned by fsGroup, group-writable.
                shutil.chown(host, group=fs_group)
                for path in [host, *host.rglob("*")]:
                    shutil.chown(path, group=fs_group)
                    path.chmod(path.stat().st_mode | 0o060 | (0o010 if path.is_dir() else 0))
            return ["-v", f"{host}:{target}"]
        if "secret" in volume:
            source = self.secrets[volume["secret"]["secretName"]]
            folder = self.work / f"secret-{mount['name']}"
            folder.mkdir()
            mode = int(volume["secret"].get("defaultMode", 0o644))
            for item in volume["secret"]["items"]:
                path = folder / item["path"]
                path.write_text(source[item["key"]])
                path.chmod(mode)
                if fs_group is not None:
                    shutil.chown(path, group=fs_group)
            return ["-v", f"{folder}:{target}:ro"]
        raise AssertionError(f"volume kind not emulated: {volume}")

    def start(self) -> None:
        docker("run", "-d", *self.run_args())

    def running(self) -> bool:
        out = docker("inspect", "-f", "{{.State.Running}}", self.server, check=False)
        return out.strip() == "true"

    def probe(self, kind: str) -> bool:
        return probe_ok(self.port, self.container[f"{kind}Probe"])

    def terminate(self) -> tuple[int, float]:
        """What the kubelet does on delete: the preStop hook, then SIGTERM with what is left
        of the grace period, then SIGKILL. Returns (exit code, seconds taken)."""
        grace = int(self.pod.get("terminationGracePeriodSeconds", 30))
        started = time.monotonic()
        pre_stop = self.container.get("lifecycle", {}).get("preStop", {}).get("exec")
        if pre_stop:
            docker("exec", self.server, *pre_stop["command"], timeout=grace)
        left = max(1, int(grace - (time.monotonic() - started)))
        docker("stop", "-t", str(left), self.server, timeout=left + 30)
        taken = time.monotonic() - started
        code = int(docker("inspect", "-f", "{{.State.ExitCode}}", self.server).strip())
        return code, taken

    def logs(self) -> str:
        done = subprocess.run(
            ["docker", "logs", self.server], capture_output=True, text=True, timeout=30
        )
        return done.stdout + done.stderr

    def remove(self) -> None:
        for name in (self.server, self.name):
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
