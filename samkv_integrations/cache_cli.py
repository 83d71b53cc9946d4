"""``samkv cache``: list, verify and garbage-collect the entries of a KV cache store.

``ls`` lists the entries (key, size, when written, when last read); ``verify`` reads each
one and checks it as an answer would (checksums, shapes, the key), and with ``--repair``
deletes those that fail, to be encoded again by the next ``samkv index`` or by the first
answer that needs them; ``gc`` deletes entries not named in a keep list, then the least
recently used down to a size cap, and temp files that crashed writers left behind.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from samkv_integrations.cli import not_empty
from samkv_integrations.errors import CacheError
from samkv_integrations.models import samkv_home
from samkv_integrations.store import KVCacheStore
from samkv_integrations.store_files import TEMP_MAX_AGE_S

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Argparse ``type=`` for a byte count: ``123``, ``500M``, ``2G``, ``1.5GiB`` (powers of 1024)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 123, 500M or 2G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def human(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it >= 1 (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds") if seconds else "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ls``, ``verify`` and ``gc`` actions and their options."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="{ls,verify,gc}")
    ls = actions.add_parser("ls", help="List the entries: key, size, written, last read.")
    ls.add_argument("--json", action="store_true", help="one JSON object per entry")
    verify = actions.add_parser("verify", help="Read and check every entry.")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="delete the entries that fail (encoded again when next indexed or needed)",
    )
    gc = actions.add_parser("gc", help="Delete entries, least recently used first.")
    gc.add_argument(
        "--keep",
        type=not_empty,
        metavar="FILE",
        help="keep only the keys listed in FILE, one per line ('-': stdin); others are deleted",
    )
    gc.add_argument(
        "--max-bytes",
        type=parse_size,
        metavar="SIZE",
        help="then delete the least recently used entries until they total at most SIZE "
        "(e.g. 500M, 20G)",
    )
    gc.add_argument(
        "--temp-age",
        type=float,
        default=TEMP_MAX_AGE_S,
        metavar="SECONDS",
        help="remove temp files older than this (default: %(default)s)",
    )
    for action in (ls, verify, gc):
        action.add_argument(
            "--store",
            type=not_empty,
            default=None,
            help="KV cache store directory or fsspec URL (default: $SAMKV_HOME/kvcache)",
        )


def run(args: argparse.Namespace) -> int:
    """Run one action; the exit status is 1 when ``verify`` leaves broken entries."""
    store = KVCacheStore(args.store if args.store is not None else samkv_home() / "kvcache")
    if args.action == "ls":
        return _ls(store, as_json=args.json)
    if args.action == "verify":
        return _verify(store, repair=args.repair)
    return _gc(store, args)


def _ls(store: KVCacheStore, *, as_json: bool) -> int:
    entries = store.entries()
    for e in entries:
        if as_json:
            fields = {"key": e.key, "nbytes": e.nbytes, "created": e.created}
            print(json.dumps({**fields, "last_used": e.last_used}))
        else:
            print(f"{e.key}  {human(e.nbytes):>10}  {_when(e.created)}  {_when(e.last_used)}")
    if not as_json:
        total = sum(e.nbytes for e in entries)
        print(f"{len(entries)} entries, {human(total)} in {store.url}", file=sys.stderr)
    return 0


def _verify(store: KVCacheStore, *, repair: bool) -> int:
    entries = store.entries()

    def problem(key: str) -> str | None:
        try:
            store.verify(key)
        except CacheError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = list(pool.map(problem, [e.key for e in entries]))
    broken = [(e.key, p) for e, p in zip(entries, problems, strict=True) if p is not None]
    for key, text in broken:
        print(f"{key}  {text}")
    summary = f"{len(entries)} entries in {store.url}: {len(broken)} broken"
    if repair and broken:
        deleted = sum(store.delete(key) for key, _ in broken)
        summary += f", {deleted} deleted (encoded again when next indexed or needed)"
    print(summary, file=sys.stderr)
    return 1 if broken and not repair else 0


def _gc(store: KVCacheStore, args: argparse.Namespace) -> int:
    keep = None
    if args.keep is not None:
        text = sys.stdin.read() if args.keep == "-" else Path(args.keep).read_text("utf-8")
        keep = {line.strip() for line in text.splitlines() if line.strip()}
    report = store.gc(keep, args.max_bytes, temp_max_age_s=args.temp_age)
    print(
        f"deleted {len(report.deleted)} entries ({human(report.freed_bytes)}), kept "
        f"{report.kept_entries} ({human(report.kept_bytes)}), removed "
        f"{report.temps_removed} stale temp files in {store.url}"
    )
    return 0
