"""Models from the Hugging Face Hub, fetched once onto the volume and reused offline.

``MODEL_REPO=owner/repo[:QUANT]`` (or ``MODEL_REPO_FILE``) names a GGUF in a Hub repo. The
files it needs (every shard of the chosen quant, nothing else) are stored in the Hub's
own cache layout under DATA_DIR::

    models--owner--repo/blobs/<sha256>            the bytes
    models--owner--repo/snapshots/<commit>/<path> -> ../../blobs/<sha256>
    models--owner--repo/refs/<revision>           the commit the revision pointed to

so every later start (also one while the Hub is unreachable) finds them, and so does any
Hub-aware tool. A model RunPod already cached on the host is used in place. The bytes
come in parallel Range parts that survive a kill, hashed as they arrive (download.py); every
blob is checked against the SHA-256 the Hub lists for it before it is used.

The Hub calls are the ones llama.cpp's own ``-hf`` makes (see the README of its server):
``api/models/<repo>/revision/<rev>`` for the commit and file list, ``api/models/<repo>/
tree/<commit>?recursive=true`` for sizes and hashes, ``<repo>/resolve/<commit>/<path>``
for the bytes. HF_TOKEN goes in an Authorization header to the Hub only (dropped on a
redirect to another host) and is never logged.

Every name the Hub's JSON gives is checked before it is joined onto the cache (a hostile
or compromised HF_ENDPOINT must not choose where files go, nor smuggle a newline into
llama-server's arguments): a commit is 40 hex digits, an LFS digest 64, a file path a plain
relative path (no ``..``, no leading ``/``, no control characters). A pinned
MODEL_REVISION is honoured: only that revision's snapshot is ever used, online or not.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import download
from .download import Source, Target, carries_token

DEFAULT_ENDPOINT = "https://huggingface.co"
# llama.cpp's -hf picks this quant when none is named, if the repo has it.
DEFAULT_QUANT = "Q4_K_M"
# Where RunPod places the repos an endpoint asks it to cache (on the host, read-only).
RUNPOD_CACHE = Path("/runpod-volume/huggingface-cache/hub")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
MAX_PATH = 1024
# A listing's JSON: the Hub's largest repos list tens of thousands of files in a few MiB.
MAX_LISTING = 32 << 20
# Quant names as they appear in GGUF file names (Q4_K_M, IQ3_XXS, Q8_0, F16, BF16, ...).
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])", re.I)


class HubError(Exception):
    """A model that cannot be had; the message names the setting to change."""


class HubUnreachable(Exception):
    """The Hub did not answer (network down, DNS, refused)."""


@dataclass(frozen=True)
class ModelRef:
    repo: str
    quant: str | None
    file: str | None
    revision: str
    # MODEL_REVISION was set: no other snapshot may stand in for it (offline neither).
    pinned: bool = False

    @property
    def cache_name(self) -> str:
        return "models--" + self.repo.replace("/", "--")


def parse_ref(env: Mapping[str, str]) -> ModelRef:
    raw = env.get("MODEL_REPO", "").strip()
    repo, _, quant = raw.partition(":")
    if not _REPO.fullmatch(repo):
        raise HubError(f"MODEL_REPO={raw!r}: expected owner/repo or owner/repo:QUANT")
    file = env.get("MODEL_REPO_FILE", "").strip() or None
    if file is not None and (not file.endswith(".gguf") or unsafe_path(file)):
        raise HubError(f"MODEL_REPO_FILE={file!r}: expected the path of a .gguf in the repo")
    pinned = env.get("MODEL_REVISION", "").strip()
    revision = pinned or "main"
    # It names refs/<revision> in the cache: a plain relative name (pr/1 nests, as on the Hub).
    if len(revision) > 128 or not _REVISION.fullmatch(revision) or unsafe_path(revision):
        raise HubError(
            f"MODEL_REVISION={revision!r}: expected a branch, tag or commit "
            "(letters, digits, . _ - and / between parts; no leading /, no ..)"
        )
    return ModelRef(repo, quant.strip() or None, file, revision, pinned=bool(pinned))


def unsafe_path(path: str) -> str | None:
    """Why ``path`` cannot be joined onto a directory, or None when it is a plain relative
    path: not empty, not absolute, no empty, ``.`` or ``..`` part, no control character
    or line separator (a newline would end an argument of llama-server's), no backslash."""
    if not path or len(path) > MAX_PATH:
        return "empty or too long"
    if path.startswith("/"):
        return "absolute"
    if any(ch == "\\" or unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in path):
        return "holds a control character, a line separator or a backslash"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, . or .. part"
    return None


def is_commit(value: object) -> bool:
    return isinstance(value, str) and _COMMIT.fullmatch(value) is not None


def quants_in(names: list[str]) -> list[str]:
    found = {m.group(1).upper() for n in names for m in [_QUANT.search(Path(n).name)] if m}
    return sorted(found)


def choose(ref: ModelRef, names: list[str]) -> list[str]:
    """The repo files the model needs: every shard of the chosen file, in order."""
    models = [n for n in names if n.endswith(".gguf") and "mmproj" not in Path(n).name.lower()]
    if ref.file is not None:
        if ref.file not in names:
            raise HubError(f"MODEL_REPO_FILE={ref.file}: no such file in {ref.repo}")
        first = ref.file
    else:
        wanted = ref.quant or DEFAULT_QUANT
        matching = sorted(n for n in models if wanted.lower() in Path(n).name.lower())
        if not matching and ref.quant is None and models:
            matching = sorted(models)  # no Q4_K_M: the first model, as llama.cpp does
        if not matching:
            have = ", ".join(quants_in(models)) or "none"
            raise HubError(
                f"MODEL_REPO={ref.repo}:{wanted}: the repo has no {wanted} GGUF "
                f"(quants it has: {have})"
            )
        first = matching[0]
    shard = _SHARD.search(first)
    if shard is None:
        return [first]
    stem = first[: shard.start()]
    total = int(shard.group(2))
    return [f"{stem}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


def _in_snapshot(snapshot: Path, files: list[str]) -> Path | None:
    paths = [snapshot / f for f in files]
    return paths[0] if all(p.is_file() for p in paths) else None


def cached(cache: Path, ref: ModelRef, pick: Callable[[list[str]], list[str]]) -> Path | None:
    """The model's first file in a Hub cache (ours or RunPod's), if complete there."""
    root = cache / ref.cache_name
    commit = _read(root / "refs" / ref.revision)
    if not is_commit(commit):
        # No (sane) ref: the revision may itself be a commit, as a snapshot's name.
        commit = ref.revision if is_commit(ref.revision) else None
    candidates = [root / "snapshots" / commit] if commit else []
    if not ref.pinned and (root / "snapshots").is_dir():
        # MODEL_REVISION unset: any complete snapshot of the repo will do.
        candidates += sorted(p for p in (root / "snapshots").iterdir() if p not in candidates)
    for snapshot in candidates:
        if not snapshot.is_dir():
            continue
        names = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")]
        try:
            found = _in_snapshot(snapshot, pick(names))
        except HubError:
            continue
        if found is not None:
            return found
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class HubFile:
    """One file of a repo at a commit, as the Hub lists it."""

    ref: ModelRef
    commit: str
    path: str
    size: int  # 0: not listed
    sha256: str | None  # None: not stored in LFS, so the Hub gives no digest

    @property
    def url(self) -> str:
        return f"/{self.ref.repo}/resolve/{self.commit}/{urllib.parse.quote(self.path)}"


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but carry the token only to the endpoint's own origin: not to the
    Hub's CDN, and never from https down to http."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and not carries_token(self.endpoint, newurl):
            new.remove_header("Authorization")
        return new


class Hub:
    def __init__(
        self,
        endpoint: str,
        token: str,
        log: Callable[[str], None],
        settings: download.Settings | None = None,
        publish: Callable[[dict[str, object]], None] | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.log = log
        self.settings = settings or download.Settings()
        self.publish = publish
        self.opener = urllib.request.build_opener(_SameHostAuth(self.endpoint))

    def _open(self, path: str, headers: dict[str, str] | None = None) -> object:
        request = urllib.request.Request(self.endpoint + path, headers=headers or {})
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return self.opener.open(request, timeout=30)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as exc:
            raise HubUnreachable(str(getattr(exc, "reason", exc))) from None

    def _json(self, path: str, ref: ModelRef) -> object:
        try:
            with self._open(path) as response:  # type: ignore[attr-defined]
                data = response.read(MAX_LISTING + 1)
        except urllib.error.HTTPError as exc:
            raise self._refused(exc.code, ref) from None
        except (OSError, http.client.HTTPException) as exc:
            raise HubUnreachable(f"{self.endpoint} cut its answer to {path}: {exc}") from None
        if len(data) > MAX_LISTING:
            raise self._hostile(f"more than {MAX_LISTING >> 20} MiB of JSON at {path}", ref)
        try:
            return json.loads(data)
        except RecursionError:
            raise self._hostile(f"JSON nested too deep at {path}", ref) from None
        except ValueError:
            raise HubUnreachable(f"{self.endpoint} answered {path} with something not JSON")

    def _refused(self, status: int, ref: ModelRef) -> Exception:
        if status in (401, 403):
            if not self.token:
                return HubError(
                    f"MODEL_REPO={ref.repo} is gated or private: set HF_TOKEN to a token "
                    "with access to it (and accept the repo's terms on the Hub)"
                )
            return HubError(
                f"HF_TOKEN is not accepted for MODEL_REPO={ref.repo} (Hub answered {status}): "
                "check the token and that its account has access to the repo"
            )
        if status == 404:
            return HubError(
                f"MODEL_REPO={ref.repo} (revision {ref.revision}) does not exist on "
                f"{self.endpoint}, or is private (then set HF_TOKEN)"
            )
        return HubUnreachable(f"{self.endpoint} answered {status}")

    def listing(self, ref: ModelRef) -> tuple[str, dict[str, HubFile]]:
        """The revision's commit and its files by path."""
        quoted = urllib.parse.quote(ref.revision, safe="")
        info = self._json(f"/api/models/{ref.repo}/revision/{quoted}", ref)
        commit = info.get("sha") if isinstance(info, dict) else None
        if commit is None:
            raise HubUnreachable("the Hub's answer names no commit")
        if not is_commit(commit):
            raise self._hostile(f"a commit id {commit!r} that is not 40 hex digits", ref)
        if is_commit(ref.revision) and commit.lower() != ref.revision.lower():
            raise self._hostile(f"commit {commit} for the pinned commit {ref.revision}", ref)
        tree = self._json(f"/api/models/{ref.repo}/tree/{commit}?recursive=true", ref)
        files: dict[str, HubFile] = {}
        for entry in tree if isinstance(tree, list) else []:
            if isinstance(entry, dict) and entry.get("type") == "file":
                file = self._listed(ref, commit, entry)
                files[file.path] = file
        return commit, files

    def _listed(self, ref: ModelRef, commit: str, entry: dict[str, object]) -> HubFile:
        """One tree entry, every name in it checked before it can become a path."""
        path = entry.get("path")
        if not isinstance(path, str) or unsafe_path(path) is not None:
            raise self._hostile(f"a file path {path!r} that is not a plain relative path", ref)
        lfs = entry.get("lfs")
        oid = lfs.get("oid") if isinstance(lfs, dict) else None
        if oid is not None and not (isinstance(oid, str) and _SHA256.fullmatch(oid)):
            raise self._hostile(
                f"an LFS digest {oid!r} for {path!r} that is not 64 hex digits", ref
            )
        size = entry.get("size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            size = 0
        return HubFile(ref, commit, path, size, oid.lower() if isinstance(oid, str) else None)

    def _hostile(self, what: str, ref: ModelRef) -> HubError:
        return HubError(
            f"HF_ENDPOINT={self.endpoint} listed {what} for MODEL_REPO={ref.repo}: refused, "
            "nothing was written (is HF_ENDPOINT the Hugging Face Hub or a faithful mirror?)"
        )

    def download(self, file: HubFile, blob: Path) -> None:
        """Fetch one file into ``blob``: parallel parts, resumed, checked (see download.py)."""
        source = Source(self.endpoint + file.url, self.endpoint, self.token)
        target = Target(blob, file.size, file.sha256, file.commit)
        path, repo = file.path, file.ref.repo
        try:
            download.download(source, target, self.settings, self.log, self.publish, path)
        except download.Refused as exc:
            if exc.status == 404:
                # The repo was listed a moment ago: it is this file that is missing (a
                # shard the first one's name counts but the repo does not have).
                raise HubError(
                    f"{path} is not in MODEL_REPO={repo} at commit {file.commit[:12]}: "
                    "the model's files there are incomplete"
                ) from None
            raise self._refused(exc.status, file.ref) from None
        except download.SizeMismatch as exc:
            raise HubError(
                f"{path} from {self.endpoint} is not the file the Hub lists ({exc}): "
                "stopped at the listed size; check HF_ENDPOINT"
            ) from None
        except download.DigestMismatch:
            raise HubError(
                f"{path} from {repo} does not match the SHA-256 the Hub lists for it"
            ) from None
        except download.TransferFailed as exc:
            raise HubError(
                f"could not download {path} from {self.endpoint} ({exc}); the parts already "
                "fetched are kept and resumed at the next start"
            ) from None


def fetch(ref: ModelRef, cache: Path, hub: Hub, runpod_caches: list[Path]) -> Path:
    """The local path of the model's first file: from RunPod's cache, ours, or the Hub."""

    def pick(names: list[str]) -> list[str]:
        return choose(ref, names)

    for runpod_cache in runpod_caches:
        found = cached(runpod_cache, ref, pick)
        if found is not None:
            hub.log(f"using the model RunPod cached on this host: {found}")
            return found
    try:
        commit, files = hub.listing(ref)
    except HubUnreachable as exc:
        found = cached(cache, ref, pick)
        if found is None:
            what = f"MODEL_REPO={ref.repo}"
            if ref.pinned:
                what += f" at the pinned MODEL_REVISION={ref.revision}"
            raise HubError(
                f"the Hub ({hub.endpoint}) is unreachable ({exc}) and {what} "
                f"is not in the cache at {cache} yet: check the network or HF_ENDPOINT"
            ) from None
        hub.log(f"the Hub is unreachable ({exc}): using the cached copy {found}")
        return found
    needed = choose(ref, list(files))
    root = cache / ref.cache_name
    snapshot = root / "snapshots" / commit
    for path in needed:
        # A shard named from the first one's count may be missing: its download says so.
        file = files.get(path) or HubFile(ref, commit, path, 0, None)
        name = file.sha256 or hashlib.sha256(f"{commit}/{path}".encode()).hexdigest()
        blob = root / "blobs" / name
        link = snapshot / path
        if not blob.is_file():
            blob.parent.mkdir(parents=True, exist_ok=True)
            hub.download(file, blob)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    refs = root / "refs" / ref.revision  # a branch like pr/1 nests, as in the Hub's cache
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(commit)
    return snapshot / needed[0]
