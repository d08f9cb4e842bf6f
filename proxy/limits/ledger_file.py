"""The embedded ledger's file: without Redis, the memory store's ledger rows (every
LEDGER_FIELDS count, split by key) are kept in a SQLite file, so that a restart loses
nothing and a SIGKILL at most the last ``accounting.ledger_interval``.

Nothing here runs on a call's path: settlements change the memory store only
(limits/memory.py); ``LedgerKeeper`` (limits/ledger_keeper.py) writes the rows changed
since its last write, every interval and once more at shutdown, through this module's
calls in a thread of their own (never the loop: a commit waits for the disk).

Under ``--workers N`` every worker writes its own rows to the same file, keyed by its
index (``LLM_PROXY_WORKER``), and restores only those at start; a read of the ledger
sums the rows of every worker. SQLite's WAL lets the workers' writes and reads proceed
side by side; a worker waits up to ``BUSY_TIMEOUT`` for another's commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

from proxy.limits.store import LEDGER_FIELDS, LedgerKey, LedgerRow, ledger_rows

SCHEMA_VERSION = 1  # PRAGMA user_version: a file of another version is refused
BUSY_TIMEOUT = 5.0  # seconds a write waits for another worker's transaction
_ROW = ("team", "model", "day", "key")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ledger (
    worker TEXT NOT NULL, team TEXT NOT NULL, model TEXT NOT NULL, day INTEGER NOT NULL,
    key TEXT NOT NULL, {", ".join(f"{name} INTEGER NOT NULL" for name in LEDGER_FIELDS)},
    PRIMARY KEY (worker, team, model, day, key)
) WITHOUT ROWID
"""
# A row holds the worker's whole count, so a write that is repeated (after one that
# failed half-way, or was never known to commit) sets the same values again.
_UPSERT = (
    f"INSERT INTO ledger (worker, {', '.join(_ROW + LEDGER_FIELDS)}) "
    f"VALUES ({', '.join('?' * (1 + len(_ROW) + len(LEDGER_FIELDS)))}) "
    f"ON CONFLICT (worker, team, model, day, key) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in LEDGER_FIELDS)
)
_SUMS = ", ".join(f"SUM({name})" for name in LEDGER_FIELDS)


class LedgerFileError(Exception):
    """The file cannot be opened, read or written (its path and SQLite's reason)."""


class LedgerFile:
    """One worker's connection to the ledger file. Its methods block: they are called
    from one thread at a time (LedgerKeeper's executor), never from the event loop."""

    def __init__(self, path: str, worker: str = "0") -> None:
        self.path = path
        self.worker = worker
        self._db: sqlite3.Connection | None = None

    def open(self) -> dict[LedgerKey, tuple[int, ...]]:
        """Open (or create) the file and return this worker's rows. Raises
        LedgerFileError for a file that is not a ledger, or cannot be written."""
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False)
            self._db = db
            db.execute("PRAGMA journal_mode=WAL")  # reads first: a corrupt file fails here
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at each checkpoint
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, not {SCHEMA_VERSION}")
            with db:  # a write at start: an unwritable file is refused now, not later
                db.execute(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return self._own_rows(db)
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise LedgerFileError(f"ledger file {self.path}: {exc}") from None

    def _own_rows(self, db: sqlite3.Connection) -> dict[LedgerKey, tuple[int, ...]]:
        query = f"SELECT {', '.join(_ROW + LEDGER_FIELDS)} FROM ledger WHERE worker = ?"
        return {
            (team, model, day, key): tuple(counts)
            for team, model, day, key, *counts in db.execute(query, (self.worker,))
        }

    def write(self, rows: Mapping[LedgerKey, tuple[int, ...]]) -> None:
        """Upsert ``rows`` in one transaction: all of them, or none."""
        db = self._connected()
        try:
            with db:
                db.executemany(_UPSERT, [(self.worker, *key, *c) for key, c in rows.items()])
        except sqlite3.Error as exc:
            raise LedgerFileError(f"ledger file {self.path}: {exc}") from None

    def read(self, teams: list[str], first_day: int, last_day: int) -> list[LedgerRow]:
        """The ledger of ``teams`` from every worker, as MemoryStore.ledger shapes it."""
        marks = ", ".join("?" * len(teams))
        query = (
            f"SELECT team, model, day, key, {_SUMS} FROM ledger WHERE team IN ({marks}) "
            "AND day BETWEEN ? AND ? GROUP BY team, model, day, key ORDER BY team, model, day, key"
        )
        try:
            found = self._connected().execute(query, (*teams, first_day, last_day)).fetchall()
        except sqlite3.Error as exc:
            raise LedgerFileError(f"ledger file {self.path}: {exc}") from None
        return ledger_rows(
            ((team, model, day, key), tuple(c)) for team, model, day, key, *c in found
        )

    def _connected(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerFileError(f"ledger file {self.path}: not open")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
