#!/usr/bin/env python3
"""Manage the gateway's API key file: generate, list, revoke, rotate, export.

The file is AUTH_KEYS_FILE (default DATA_DIR/api_keys.txt, DATA_DIR detected as the
gateway does) unless --file is given. Every change rewrites the file atomically (a 0600
temporary file renamed over it), keeping comments and other lines as they were; the
running gateway picks the change up within a second (or on SIGHUP). A new secret is
printed once, to stdout, and nowhere else.

    key_mgmt.py generate alice --rpm 60 --tpm 200000 --hashed
    key_mgmt.py generate tenant --models tiny --monthly-tokens 5000000 --priority 2
    key_mgmt.py list
    key_mgmt.py rotate alice
    key_mgmt.py revoke alice
    key_mgmt.py export alice tenant    # the lines as one API_KEYS value (';'-separated)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
import tempfile
from pathlib import Path

from gguf_gateway.config import detect_data_dir
from gguf_gateway.keys import parse_key_line


def default_file() -> Path:
    explicit = os.environ.get("AUTH_KEYS_FILE", "").strip()
    return Path(explicit) if explicit else detect_data_dir(os.environ) / "api_keys.txt"


def new_secret() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def line_key_id(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped.split()[0]:
        return None
    return stripped.split()[0].split(":", 1)[0]


def find(lines: list[str], key_id: str) -> int | None:
    for index, line in enumerate(lines):
        if line_key_id(line) == key_id:
            return index
    return None


def fields_of(args: argparse.Namespace) -> list[str]:
    fields = []
    for name in (
        "rpm",
        "tpm",
        "concurrency",
        "expires",
        "scopes",
        "models",
        "daily_tokens",
        "monthly_tokens",
        "priority",
    ):
        value = getattr(args, name, None)
        if value is not None:
            fields.append(f"{name}={value}")
    return fields


def build_line(key_id: str, secret: str, fields: list[str], hashed: bool) -> str:
    stored = "sha256:" + hashlib.sha256(secret.encode()).hexdigest() if hashed else secret
    line = " ".join([f"{key_id}:{stored}", *fields])
    parse_key_line(line)  # raises ValueError with a message naming the bad field
    return line


def cmd_generate(args: argparse.Namespace) -> int:
    lines = read_lines(args.file)
    if find(lines, args.key_id) is not None:
        print(
            f"key_mgmt: key id '{args.key_id}' already exists in {args.file} (use rotate)",
            file=sys.stderr,
        )
        return 1
    secret = new_secret()
    lines.append(build_line(args.key_id, secret, fields_of(args), args.hashed))
    write_lines(args.file, lines)
    print(secret)
    print(
        f"key '{args.key_id}' added to {args.file}; the secret above is shown only once",
        file=sys.stderr,
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    lines = read_lines(args.file)
    rows = []
    for number, line in enumerate(lines, start=1):
        key_id = line_key_id(line)
        if key_id is None:
            continue
        words = line.split()
        stored = "hashed" if words[0].split(":", 1)[1].startswith("sha256:") else "plain"
        try:
            parse_key_line(line.strip())
            state = "ok"
            fields = " ".join(words[1:]) or "-"
        except ValueError as exc:
            # Whatever follows the id on a broken line may be a mistyped secret: not shown.
            state = f"invalid ({exc})"
            fields = "?"
        rows.append((key_id, stored, fields, state, number))
    if not rows:
        print(f"no keys in {args.file}")
        return 0
    width = max(len(r[0]) for r in rows)
    for key_id, stored, fields, state, number in rows:
        print(f"{key_id:<{width}}  {stored:<6}  {fields}  [{state}, line {number}]")
    return 0


def locate(args: argparse.Namespace) -> tuple[list[str], list[int]] | None:
    """The file's lines and the index of every line with args.key_id, or None (said)."""
    lines = read_lines(args.file)
    indexes = [i for i, line in enumerate(lines) if line_key_id(line) == args.key_id]
    if not indexes:
        print(f"key_mgmt: no key '{args.key_id}' in {args.file}", file=sys.stderr)
        return None
    return lines, indexes


def cmd_revoke(args: argparse.Namespace) -> int:
    found = locate(args)
    if found is None:
        return 1
    lines, indexes = found
    # Every line with the id: a duplicate left behind would keep a secret working.
    for index in reversed(indexes):
        del lines[index]
    write_lines(args.file, lines)
    print(f"key '{args.key_id}' revoked", file=sys.stderr)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    found = locate(args)
    if found is None:
        return 1
    lines, indexes = found
    first = indexes[0]
    words = lines[first].split()
    hashed = args.hashed or words[0].split(":", 1)[1].startswith("sha256:")
    secret = new_secret()
    lines[first] = build_line(args.key_id, secret, words[1:], hashed)
    for index in reversed(indexes[1:]):
        del lines[index]  # duplicates: their old secrets must stop working too
    write_lines(args.file, lines)
    print(secret)
    print(f"key '{args.key_id}' rotated: the old secret stops working now", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The valid key lines (all, or those of the ids named) as one API_KEYS value."""
    lines = read_lines(args.file)
    wanted = set(args.key_ids)
    chosen: list[str] = []
    for line in lines:
        key_id = line_key_id(line)
        if key_id is None or (wanted and key_id not in wanted):
            continue
        try:
            parse_key_line(line.strip())
        except ValueError:
            continue  # broken lines stay behind (and are not shown: they may hold a secret)
        chosen.append(" ".join(line.split()))
    missing = wanted - {line_key_id(line) for line in chosen}
    if missing:
        print(
            f"key_mgmt: no valid key {', '.join(sorted(missing))} in {args.file}", file=sys.stderr
        )
        return 1
    if not chosen:
        print(f"key_mgmt: no keys in {args.file}", file=sys.stderr)
        return 1
    print(";".join(chosen))
    hashed = all(line.split()[0].split(":", 1)[1].startswith("sha256:") for line in chosen)
    print(
        f"{len(chosen)} key line(s) above, for API_KEYS"
        + ("" if hashed else "; plaintext secrets included: store it as a secret"),
        file=sys.stderr,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="key_mgmt.py", description=__doc__.split("\n\n")[0])
    top.add_argument("--file", type=Path, default=None, help="key file (default: AUTH_KEYS_FILE)")
    sub = top.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="add a key and print its secret once")
    gen.add_argument("key_id")
    gen.add_argument(
        "--hashed", action="store_true", help="store sha256 of the secret, not the secret"
    )
    gen.add_argument("--rpm", type=int, help="requests per minute")
    gen.add_argument("--tpm", type=int, help="tokens per minute (prompt + completion)")
    gen.add_argument("--concurrency", type=int, help="requests running at once")
    gen.add_argument("--expires", help="ISO 8601 time, e.g. 2027-01-01T00:00:00Z")
    gen.add_argument("--scopes", help="inference (default) or inference,admin")
    gen.add_argument("--models", help="model ids the key may use, comma-separated (default all)")
    gen.add_argument("--daily-tokens", type=int, help="tokens per UTC day (prompt + completion)")
    gen.add_argument("--monthly-tokens", type=int, help="tokens per UTC calendar month")
    gen.add_argument("--priority", type=int, help="weight in the fair queue, 1-10 (default 1)")
    gen.set_defaults(run=cmd_generate)

    lst = sub.add_parser("list", help="key ids and fields, never secrets")
    lst.set_defaults(run=cmd_list)

    rev = sub.add_parser("revoke", help="remove a key")
    rev.add_argument("key_id")
    rev.set_defaults(run=cmd_revoke)

    rot = sub.add_parser("rotate", help="give a key a new secret, keeping its fields")
    rot.add_argument("key_id")
    rot.add_argument("--hashed", action="store_true", help="store the new secret hashed")
    rot.set_defaults(run=cmd_rotate)
    exp = sub.add_parser(
        "export", help="print key lines as one API_KEYS value (';'-separated), to stdout"
    )
    exp.add_argument("key_ids", nargs="*", help="the keys to export (default: all)")
    exp.set_defaults(run=cmd_export)
    return top


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.file is None:
        args.file = default_file()
    try:
        result: int = args.run(args)
    except ValueError as exc:
        print(f"key_mgmt: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"key_mgmt: {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
