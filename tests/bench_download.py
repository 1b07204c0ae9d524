"""Benchmark: a cold model download, ours against the Hub's own downloaders, same run.

A deterministic 1 GiB file (generated in a temporary directory) is served by the stand-in
Hub shaped like a real CDN edge: a cap per connection (20 MB/s), a cap on everything
together (160 MB/s) and 50 ms before each response's first byte. The same file is fetched
by this project's downloader (gguf_gateway/download.py) with one connection and with N,
with and without hashing, by ``hf_transfer`` (the Hub's parallel downloader, given the
resolve URL) and by ``huggingface_hub`` over plain HTTP (``HF_HUB_DISABLE_XET=1``). Then
ours is killed at 50 % and restarted, and, with --faults, run through a stall and a dropped
connection. Each download runs in its own process; its CPU time is that process's.

Prints one JSON object with the figures, the ratios and the targets' verdicts. A benchmark,
not a test: nothing here passes or fails.

    python tests/bench_download.py [--size-mib 1024] [--connections 8] [--repeat 3] [--faults]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))

from support.fake_hub import FakeHub, FileOnDisk, HubRepo  # noqa: E402

REPO = "bench/model-GGUF"
NAME = "model-Q4_K_M.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MIB = 1024 * 1024


def make_file(path: Path, size: int) -> FileOnDisk:
    """1 MiB blocks of seeded random bytes, each starting with its index: no two alike."""
    base = random.Random(20261202).randbytes(MIB)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for index in range(-(-size // MIB)):
            block = (index.to_bytes(8, "big") + base[8:])[: min(MIB, size - index * MIB)]
            out.write(block)
            digest.update(block)
    return FileOnDisk(path, size, digest.hexdigest())


def child(args: argparse.Namespace) -> None:
    """One download in this process; prints {"seconds": ..., ...} for the parent."""
    started = time.monotonic()
    extra: dict[str, Any] = {}
    if args.child == "ours":
        from gguf_gateway import download

        report = download.download(
            download.Source(args.url, args.endpoint),
            download.Target(Path(args.dest), args.size, args.sha or None, COMMIT),
            download.Settings(connections=args.connections),
            lambda line: print(line, file=sys.stderr, flush=True),
        )
        extra = {"requests": report.requests, "reissued": report.reissued}
    elif args.child == "hf_transfer":
        import hf_transfer  # type: ignore[import-untyped,import-not-found,unused-ignore]

        # As huggingface_hub drives it: 10 MB chunks, retries; as many files as ours.
        hf_transfer.download(
            url=args.url,
            filename=args.dest,
            max_files=args.connections,
            chunk_size=10 * MIB,
            parallel_failures=3,
            max_retries=5,
        )
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(REPO, NAME, revision=COMMIT, cache_dir=args.dest)
        extra = {"path": path}
    print(json.dumps({"seconds": time.monotonic() - started, **extra}))


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Bench:
    def __init__(self, hub: FakeHub, source: FileOnDisk, work: Path, connections: int) -> None:
        self.hub = hub
        self.source = source
        self.work = work
        self.connections = connections
        self.url = f"{hub.url}/{REPO}/resolve/{COMMIT}/{NAME}"

    def command(self, kind: str, dest: Path, connections: int, verify: bool = True) -> list[str]:
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            kind,
            "--url",
            self.url,
            "--endpoint",
            self.hub.url,
            "--dest",
            str(dest),
            "--size",
            str(self.source.size),
            "--sha",
            self.source.sha256 if verify else "",
            "--connections",
            str(connections),
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HF_ENDPOINT=self.hub.url,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_ENABLE_HF_TRANSFER="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_OFFLINE="0",
        )
        return env

    def run(self, name: str, kind: str, connections: int, verify: bool = True) -> dict[str, Any]:
        dest = self.work / name
        if kind == "huggingface_hub":
            dest.mkdir()
        self.hub.settle()
        sent = self.hub.sent()
        cpu = cpu_of_children()
        done = subprocess.run(
            self.command(kind, dest, connections, verify),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=1800,
        )
        cpu = cpu_of_children() - cpu
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-3:]}
        result = json.loads(done.stdout.strip().splitlines()[-1])
        seconds = result["seconds"]
        path = Path(result.pop("path", dest))
        correct = self.digest(path) == self.source.sha256
        self.hub.settle()
        figures = {
            "seconds": round(seconds, 2),
            "mb_per_s": round(self.source.size / seconds / 1e6, 1),
            "cpu_seconds": round(cpu, 2),
            "cores": round(cpu / seconds, 2),
            "bytes_served": self.hub.sent() - sent,
            "correct": correct,
            **result,
        }
        self.clean(dest)
        return figures

    def kill_at_half(self, connections: int) -> dict[str, Any]:
        dest = self.work / "killed"
        sidecar = dest.with_name(dest.name + ".incomplete.parts")
        parts = -(-self.source.size // (4 * MIB))
        self.hub.settle()
        sent = self.hub.sent()
        proc = subprocess.Popen(
            self.command("ours", dest, connections),
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        recorded = 0
        while proc.poll() is None:
            try:
                recorded = len(sidecar.read_text().splitlines()) - 1
            except OSError:
                recorded = 0
            if recorded >= parts // 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.communicate()
        self.hub.settle()
        before = self.hub.sent() - sent
        again = subprocess.run(
            self.command("ours", dest, connections),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=1800,
        )
        self.hub.settle()
        total = self.hub.sent() - sent
        correct = again.returncode == 0 and self.digest(dest) == self.source.sha256
        self.clean(dest)
        refetched = total - self.source.size
        return {
            "killed_with_parts_recorded": recorded,
            "parts": parts,
            "bytes_served_before_kill": before,
            "bytes_served_in_all": total,
            "refetched_bytes": refetched,
            "refetched_percent": round(100 * refetched / self.source.size, 2),
            "correct": correct,
        }

    def digest(self, path: Path) -> str:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                while block := handle.read(8 * MIB):
                    digest.update(block)
        except OSError:
            return ""
        return digest.hexdigest()

    def clean(self, dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        for path in (dest, *dest.parent.glob(dest.name + ".incomplete*")):
            if path.is_file():
                path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--faults", action="store_true", help="also a run with a stall and a drop")
    parser.add_argument("--skip-one-stream", action="store_true", help="skip the slowest runs")
    parser.add_argument("--repeat", type=int, default=3, help="samples of each quick run")
    parser.add_argument("--child", choices=("ours", "hf_transfer", "huggingface_hub"))
    parser.add_argument("--url")
    parser.add_argument("--endpoint")
    parser.add_argument("--dest")
    parser.add_argument("--size", type=int)
    parser.add_argument("--sha", default="")
    args = parser.parse_args()
    if args.child:
        return child(args)

    n = args.connections
    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    try:
        source = make_file(work / "source.bin", args.size_mib * MIB)
        hub = FakeHub(
            {REPO: HubRepo({NAME: source}, commit=COMMIT)},
            connection_rate=20e6,
            total_rate=160e6,
            first_byte_delay=0.05,
            block=128 * 1024,
        ).start()
        bench = Bench(hub, source, work, n)
        runs: dict[str, Any] = {}
        try:
            # The quick runs, interleaved and repeated: this machine is shared, and one
            # sample of each would mostly measure who else was busy at that moment.
            samples: dict[str, list[dict[str, Any]]] = {}
            for _ in range(args.repeat):
                for name, kind, verify in (
                    (f"ours_{n}", "ours", True),
                    (f"ours_{n}_no_verify", "ours", False),
                    ("hf_transfer", "hf_transfer", True),
                ):
                    samples.setdefault(name, []).append(bench.run(name, kind, n, verify))
            runs.update({name: median_run(found) for name, found in samples.items()})
            runs["kill_at_50_percent_then_restart"] = bench.kill_at_half(n)
            if args.faults:
                hub.stall = {hub._ordinal + 5}
                hub.drop = {hub._ordinal + 9}
                runs[f"ours_{n}_stall_and_drop"] = bench.run("ours-faults", "ours", n)
                hub.stall, hub.drop = set(), set()
            if not args.skip_one_stream:
                runs["ours_1"] = bench.run("ours-1", "ours", 1)
                runs["huggingface_hub"] = bench.run("hfh", "huggingface_hub", n)
        finally:
            hub.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary(runs, n, args.size_mib), indent=2))


def median_run(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The sample with the median time, with every sample's MB/s beside it."""
    good = [s for s in samples if "seconds" in s]
    if not good:
        return samples[-1]
    chosen = dict(sorted(good, key=lambda s: s["seconds"])[len(good) // 2])
    chosen["mb_per_s_samples"] = [s["mb_per_s"] for s in good]
    chosen["cores_samples"] = [s["cores"] for s in good]
    chosen["all_correct"] = all(s["correct"] for s in good)
    return chosen


def summary(runs: dict[str, Any], n: int, size_mib: int) -> dict[str, Any]:
    def rate(name: str) -> float | None:
        value = runs.get(name, {}).get("mb_per_s")
        return float(value) if value else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    ours, one, hft = rate(f"ours_{n}"), rate("ours_1"), rate("hf_transfer")
    plain = runs.get(f"ours_{n}_no_verify", {}).get("seconds")
    verified = runs.get(f"ours_{n}", {}).get("seconds")
    kill = runs.get("kill_at_50_percent_then_restart", {})
    cores = runs.get(f"ours_{n}", {}).get("cores")
    ratios = {
        f"ours_{n}_vs_ours_1": ratio(ours, one),
        f"ours_{n}_vs_hf_transfer": ratio(ours, hft),
        f"ours_{n}_vs_huggingface_hub": ratio(ours, rate("huggingface_hub")),
        "download_and_verify_vs_download_alone": ratio(verified, plain),
        "refetched_after_kill_percent": kill.get("refetched_percent"),
        "cores_on_average": cores,
    }

    def verdict(value: float | None, ok: bool) -> bool | None:
        return None if value is None else ok

    r = ratios
    targets = {
        "n_connections_at_least_6x_one_stream": verdict(
            r[f"ours_{n}_vs_ours_1"], (r[f"ours_{n}_vs_ours_1"] or 0) >= 6
        ),
        "at_least_0.9x_hf_transfer": verdict(
            r[f"ours_{n}_vs_hf_transfer"], (r[f"ours_{n}_vs_hf_transfer"] or 0) >= 0.9
        ),
        "kill_at_50_percent_refetches_at_most_5_percent": verdict(
            r["refetched_after_kill_percent"], (r["refetched_after_kill_percent"] or 0) <= 5
        ),
        "download_and_verify_at_most_1.1x_download": verdict(
            r["download_and_verify_vs_download_alone"],
            (r["download_and_verify_vs_download_alone"] or 99) <= 1.1,
        ),
        "at_most_1_core_on_average": verdict(cores, (cores or 99) <= 1.0),
    }
    return {
        "file_mib": size_mib,
        "shaping": {
            "per_connection_mb_per_s": 20,
            "total_mb_per_s": 160,
            "first_byte_ms": 50,
        },
        "connections": n,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "runs": runs,
        "ratios": ratios,
        "targets": targets,
    }


if __name__ == "__main__":
    main()
