"""The on-disk outbox: a SQLite database in WAL mode, used synchronously from one thread.

The proxy drives it from its single outbox thread (see outbox.py); the `dead-letters` CLI opens the same
file from another process while the proxy runs. WAL lets readers run beside the writer, `busy_timeout`
makes the two writers queue instead of failing, and every write transaction is `BEGIN IMMEDIATE` so a
writer takes the lock up front rather than failing on a read-to-write upgrade.

Tables: `pending` holds one row per (record, reporter) still to deliver, `dead_letters` the rows given
up on (same id, so `replay --id N` names the row everywhere), `counts` the row counts of both, kept
by triggers so gauges and the size cap never run COUNT(*) over a million rows.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

SCHEMA_VERSION = 1
DB_NAME = "usage.sqlite3"
BUSY_TIMEOUT_MS = 5000

# Dead-letter reasons (also the `reason` label of the dead_letter metric).
EXPIRED = "expired"  # retryable failures for longer than max_age
REJECTED = "rejected"  # non-retryable answers max_attempts times
OUTBOX_FULL = "outbox_full"  # pushed out by the size cap

_SCHEMA = """
CREATE TABLE pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused, a dead letter keeps its id
    reporter TEXT NOT NULL,
    request_id TEXT NOT NULL,
    body BLOB NOT NULL,                    -- the record as JSON
    created REAL NOT NULL,                 -- unix time the proxy appended the record
    retry_since REAL NOT NULL,             -- start of the max_age window (created, or the last replay)
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT
);
CREATE INDEX pending_due ON pending (reporter, next_attempt_at);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    reporter TEXT NOT NULL,
    request_id TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    reason TEXT NOT NULL,
    dead_at REAL NOT NULL
);
CREATE TABLE counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT INTO counts VALUES ('pending', 0), ('dead', 0);
CREATE TRIGGER pending_ins AFTER INSERT ON pending BEGIN UPDATE counts SET n = n + 1 WHERE name = 'pending'; END;
CREATE TRIGGER pending_del AFTER DELETE ON pending BEGIN UPDATE counts SET n = n - 1 WHERE name = 'pending'; END;
CREATE TRIGGER dead_ins AFTER INSERT ON dead_letters BEGIN UPDATE counts SET n = n + 1 WHERE name = 'dead'; END;
CREATE TRIGGER dead_del AFTER DELETE ON dead_letters BEGIN UPDATE counts SET n = n - 1 WHERE name = 'dead'; END;
"""

_MOVE_TO_DEAD = """
INSERT OR REPLACE INTO dead_letters
    (id, reporter, request_id, body, created, attempts, last_status, last_error, reason, dead_at)
SELECT id, reporter, request_id, body, created, attempts + ?, COALESCE(?, last_status), COALESCE(?, last_error), ?, ?
FROM pending WHERE id = ?
"""


class SpoolError(Exception):
    """The spool cannot be used: its database is missing or of an unknown schema version, or it is locked."""


class SpoolLocked(SpoolError):
    """Another process holds the spool's lock (`holder`: its pid, None when it could not be read)."""

    def __init__(self, spool_dir: str, holder: int | None) -> None:
        self.spool_dir, self.holder = spool_dir, holder
        who = f"another llmproxy (pid {holder})" if holder is not None else "another llmproxy process"
        super().__init__(f"usage spool {spool_dir} is in use by {who}; give each instance its own usage.spool_dir")


@dataclass(slots=True)
class Row:
    """A pending delivery, as a worker sees it."""

    id: int
    request_id: str
    body: bytes
    created: float
    retry_since: float
    attempts: int  # before the attempt about to be made


@dataclass(slots=True)
class Action:
    """What an attempt decided for one row, applied by `SpoolDB.apply`."""

    row_id: int
    kind: str  # "delivered" | "retry" | "dead"
    next_attempt_at: float = 0.0
    status: int | None = None  # HTTP status of the attempt, None without an answer
    error: str | None = None  # short description or response body excerpt
    reason: str | None = None  # dead-letter reason
    failure: str | None = None  # metric label of a failed attempt
    retryable: bool = False  # the failure says the consumer is unwell (makes the dispatcher probe it)
    retry_after: float = 0.0  # seconds the consumer asked to wait (Retry-After), 0 when it did not say


def db_path(spool_dir: str) -> str:
    return os.path.join(spool_dir, DB_NAME)


class SpoolDB:
    """Synchronous access to the spool. Not thread-safe: one thread (or one CLI process) per instance."""

    def __init__(self, spool_dir: str, *, create: bool = True, counts_lock: threading.Lock | None = None) -> None:
        path = db_path(spool_dir)
        # Guards the published counts, so a reader in another thread sees them consistent with its own state.
        self.counts_lock = counts_lock or threading.Lock()
        if create:
            os.makedirs(spool_dir, exist_ok=True)
        elif not os.path.exists(path):
            raise SpoolError(f"no usage spool at {path}")
        # isolation_level=None: transactions are explicit, so a group commit is exactly one transaction.
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                    timeout=BUSY_TIMEOUT_MS / 1000)
        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed group survives power loss too; fsyncs happen once per group, not per record.
        self.conn.execute("PRAGMA synchronous = FULL")
        self._migrate(create)
        self.pending = 0
        self.dead = 0
        self._read_counts()

    def close(self) -> None:
        self.conn.close()

    def _migrate(self, create: bool) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version != 0 or not create:
            raise SpoolError(f"usage spool schema version {version}, this llmproxy knows {SCHEMA_VERSION}")
        with self._write():
            # user_version is set inside the same transaction: a crash never leaves a half-made schema.
            for statement in _SCHEMA.split(";\n"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _write(self) -> _Transaction:
        return _Transaction(self.conn)

    def _read_counts(self, published: Callable[[], None] | None = None) -> None:
        counts = dict(self.conn.execute("SELECT name, n FROM counts").fetchall())
        with self.counts_lock:
            self.pending, self.dead = counts["pending"], counts["dead"]
            if published is not None:
                published()

    # Used by the proxy (outbox thread) -----------------------------------------------------------

    def insert_batch(self, items: list[tuple[dict[str, Any], float]], reporters: list[str], cap: int,
                     published: Callable[[], None] | None = None) -> dict[str, int]:
        """Append one row per (record, reporter); enforce the cap. Returns rows pushed out, per reporter.

        `published` runs under `counts_lock` as the new counts are published (see Outbox.pending_count).
        """
        rows = []
        for record, created in items:
            # default=str: a stray non-JSON value (Decimal, datetime) is stringified rather than the record lost.
            body = orjson.dumps(record, default=str)
            request_id = str(record.get("request_id") or uuid.uuid4())
            rows.extend((name, request_id, body, created, created, created) for name in reporters)
        with self._write():
            self.conn.executemany(
                "INSERT INTO pending (reporter, request_id, body, created, retry_since, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?, ?)", rows)
            overflow = self._enforce_cap(cap, time.time())
        try:
            self._read_counts(published)
        except sqlite3.Error:
            # Committed: an error now must not make the caller write the batch a second time.
            with self.counts_lock:
                if published is not None:
                    published()
        return overflow

    def _enforce_cap(self, cap: int, now: float) -> dict[str, int]:
        excess = self.conn.execute("SELECT n FROM counts WHERE name = 'pending'").fetchone()[0] - cap
        if excess <= 0:
            return {}
        oldest = "SELECT id FROM pending ORDER BY id LIMIT ?"
        overflow = dict(self.conn.execute(
            f"SELECT reporter, COUNT(*) FROM pending WHERE id IN ({oldest}) GROUP BY reporter", (excess,)).fetchall())
        self.conn.execute(
            "INSERT OR REPLACE INTO dead_letters"
            " (id, reporter, request_id, body, created, attempts, last_status, last_error, reason, dead_at)"
            " SELECT id, reporter, request_id, body, created, attempts, last_status, last_error, ?, ?"
            f" FROM pending WHERE id IN ({oldest})", (OUTBOX_FULL, now, excess))
        self.conn.execute(f"DELETE FROM pending WHERE id IN ({oldest})", (excess,))
        return overflow

    def claim(self, reporter: str, now: float, limit: int, exclude: Iterable[int]) -> tuple[list[Row], float | None]:
        """Due rows of `reporter` not in flight (oldest due first), and when the next other row falls due."""
        excluded = list(exclude)
        not_in = f" AND id NOT IN ({','.join('?' * len(excluded))})" if excluded else ""
        rows = [Row(*values) for values in self.conn.execute(
            "SELECT id, request_id, body, created, retry_since, attempts FROM pending"
            f" WHERE reporter = ? AND next_attempt_at <= ?{not_in} ORDER BY next_attempt_at, id LIMIT ?",
            (reporter, now, *excluded, limit))] if limit > 0 else []
        excluded.extend(row.id for row in rows)
        not_in = f" AND id NOT IN ({','.join('?' * len(excluded))})" if excluded else ""
        next_due = self.conn.execute(
            f"SELECT MIN(next_attempt_at) FROM pending WHERE reporter = ?{not_in}", (reporter, *excluded)).fetchone()[0]
        self._read_counts()  # cheap, and picks up replays made by the CLI
        return rows, next_due

    def apply(self, actions: list[Action], now: float) -> None:
        """Record the outcome of attempts, all in one transaction."""
        with self._write():
            for action in actions:
                if action.kind == "delivered":
                    gone = self.conn.execute("DELETE FROM pending WHERE id = ?", (action.row_id,)).rowcount
                    if not gone:
                        # Delivered while the size cap pushed it out: the dead letter would only cause a duplicate.
                        self.conn.execute("DELETE FROM dead_letters WHERE id = ? AND reason = ?",
                                          (action.row_id, OUTBOX_FULL))
                elif action.kind == "retry":
                    self.conn.execute(
                        "UPDATE pending SET attempts = attempts + 1, next_attempt_at = ?, last_status = ?,"
                        " last_error = ? WHERE id = ?",
                        (action.next_attempt_at, action.status, action.error, action.row_id))
                else:
                    self.conn.execute(_MOVE_TO_DEAD, (1, action.status, action.error, action.reason, now,
                                                      action.row_id))
                    self.conn.execute("DELETE FROM pending WHERE id = ?", (action.row_id,))
        self._read_counts()

    def reporters_with_pending(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT reporter, COUNT(*) FROM pending GROUP BY reporter").fetchall())

    # Used by the CLI ---------------------------------------------------------------------------------

    def dead_letters(self, reporter: str | None = None) -> Iterator[dict[str, Any]]:
        where, args = (" WHERE reporter = ?", (reporter,)) if reporter else ("", ())
        cursor = self.conn.execute(
            "SELECT id, reporter, request_id, reason, attempts, created, last_status, last_error, dead_at, body"
            f" FROM dead_letters{where} ORDER BY id", args)
        names = [column[0] for column in cursor.description]
        for values in cursor:
            yield dict(zip(names, values, strict=True))

    def replay(self, ids: list[int] | None, reporter: str | None, now: float) -> int:
        """Move dead letters back to pending, due now, attempts reset and a fresh max_age window.

        `ids=None` replays all (of `reporter` if given). Returns the number of rows moved.
        """
        conditions, args = [], []
        if ids is not None:
            conditions.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if reporter:
            conditions.append("reporter = ?")
            args.append(reporter)
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        with self._write():
            self.conn.execute(
                "INSERT INTO pending (id, reporter, request_id, body, created, retry_since, attempts, next_attempt_at)"
                f" SELECT id, reporter, request_id, body, created, ?, 0, ? FROM dead_letters{where}", (now, now, *args))
            moved = self.conn.execute(f"DELETE FROM dead_letters{where}", args).rowcount
        self._read_counts()
        return moved


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error:
                # A failed COMMIT (busy, disk full) leaves the transaction open: the next BEGIN would fail too.
                self.conn.execute("ROLLBACK")
                raise
        self.conn.execute("ROLLBACK")
