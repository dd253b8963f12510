"""`llmproxy usage dead-letters list|replay`: inspect and replay dead letters, also while the proxy runs.

The spool is SQLite in WAL mode: this process reads beside the running proxy, and its writes wait for
the proxy's (busy_timeout) instead of failing. A replayed row is due at once with its attempts reset;
the proxy's worker for that reporter picks it up within a second (it polls for rows it did not write).

With several worker processes each has its own spool (see spooldirs.py): `list` and `replay --all` cover
all of them, each line says which spool it is from, and ids, being per spool, need `--spool` to replay.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson

from llmproxy.delivery.spool import SpoolDB, SpoolError
from llmproxy.delivery.spooldirs import BASE, existing_spools


def dead_letters_main(argv: list[str], spool_dir: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run `dead-letters list|replay` on the spools under `spool_dir`. Returns the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on errors; the caller wants a status
        return int(exc.code or 0)
    spools = existing_spools(spool_dir) or [(BASE, spool_dir)]  # none at all: opening the base one says so
    if args.spool is not None:
        spools = [(name, path) for name, path in spools if name == args.spool]
        if not spools:
            print(f"llmproxy: no usage spool {args.spool!r} under {spool_dir}", file=err)
            return 1
    if args.command == "replay" and args.ids is not None and len(spools) > 1:
        names = ", ".join(name for name, _ in spools)
        print(f"llmproxy: dead letter ids are per spool and there are several ({names}): name one with --spool",
              file=err)
        return 1
    moved = 0
    for name, path in spools:
        try:
            db = SpoolDB(path, create=False)
        except SpoolError as exc:
            print(f"llmproxy: {exc}", file=err)
            return 1
        try:
            if args.command == "list":
                _list(db, name, args, out)
            else:
                moved += db.replay(args.ids, args.reporter, time.time())
        finally:
            db.close()
    if args.command == "replay":
        return _replayed(moved, args, out, err)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmproxy usage dead-letters",
                                     description="Inspect or replay usage records that could not be delivered.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print dead letters as JSON lines")
    listing.add_argument("--reporter", help="only this reporter's")
    listing.add_argument("--body", action="store_true", help="include the usage record itself")
    listing.add_argument("--spool", help='only this spool\'s ("." or worker-<i>, as listed)')
    replay = commands.add_parser("replay", help="move dead letters back to pending, attempts reset")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, action="append", dest="ids", metavar="N", help="a dead letter id (repeatable)")
    which.add_argument("--all", action="store_true", help="every dead letter (of --reporter if given)")
    replay.add_argument("--reporter", help="only this reporter's")
    replay.add_argument("--spool", help='only this spool\'s ("." or worker-<i>); needed with --id if there are '
                        "several")
    return parser


def _list(db: SpoolDB, spool: str, args: argparse.Namespace, out: TextIO) -> None:
    for row in db.dead_letters(args.reporter):
        line: dict[str, Any] = {
            "spool": spool, "id": row["id"], "reporter": row["reporter"], "request_id": row["request_id"],
            "reason": row["reason"], "attempts": row["attempts"], "created": _iso(row["created"]),
            "last_status": row["last_status"], "error": row["last_error"], "dead_at": _iso(row["dead_at"])}
        if args.body:
            line["record"] = orjson.loads(row["body"])
        out.write(orjson.dumps(line).decode() + "\n")


def _replayed(moved: int, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    out.write(orjson.dumps({"replayed": moved}).decode() + "\n")
    if args.ids is not None and moved < len(set(args.ids)):
        print(f"llmproxy: {len(set(args.ids)) - moved} of the given ids are not dead letters"
              + (f" of reporter {args.reporter}" if args.reporter else ""), file=err)
        return 1
    return 0


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
