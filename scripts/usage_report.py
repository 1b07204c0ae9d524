#!/usr/bin/env python3
"""Summarise the usage ledger per key and day.

    python3 scripts/usage_report.py [--ledger PATH] [--json]

Reads LOG_DIR/usage.jsonl and its rotated files (LOG_DIR defaults to DATA_DIR/logs, with
DATA_DIR detected as the gateway does) and prints, per day (UTC) and key id: requests,
errors (status >= 400), client disconnects, prompt and completion tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from gguf_gateway.config import detect_data_dir
from gguf_gateway.ledger import archives


def ledger_files(path: Path) -> list[Path]:
    return archives(path) + ([path] if path.exists() else [])


def summarise(files: list[Path]) -> dict[tuple[str, str], dict[str, int]]:
    totals: dict[tuple[str, str], dict[str, int]] = defaultdict(
        lambda: {
            "requests": 0,
            "errors": 0,
            "disconnects": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
    )
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                row = totals[(str(entry.get("ts", ""))[:10], str(entry.get("key_id", "-")))]
                row["requests"] += 1
                row["errors"] += 1 if int(entry.get("status") or 0) >= 400 else 0
                row["disconnects"] += 1 if entry.get("disconnected") else 0
                row["prompt_tokens"] += int(entry.get("prompt_tokens") or 0)
                row["completion_tokens"] += int(entry.get("completion_tokens") or 0)
    return dict(totals)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = os.environ.get("LOG_DIR") or str(detect_data_dir(os.environ) / "logs")
    parser.add_argument("--ledger", type=Path, default=Path(default_dir) / "usage.jsonl")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    files = ledger_files(args.ledger)
    if not files:
        print(f"no usage ledger at {args.ledger}", file=sys.stderr)
        return 1
    rows = summarise(files)
    if args.json:
        for (day, key_id), row in sorted(rows.items()):
            print(json.dumps({"day": day, "key_id": key_id, **row}))
        return 0
    print(
        f"{'day':<10}  {'key':<20} {'requests':>9} {'errors':>7} {'gone':>5} {'prompt':>10} {'completion':>11}"
    )
    for (day, key_id), row in sorted(rows.items()):
        print(
            f"{day:<10}  {key_id:<20} {row['requests']:>9} {row['errors']:>7} {row['disconnects']:>5}"
            f" {row['prompt_tokens']:>10} {row['completion_tokens']:>11}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
