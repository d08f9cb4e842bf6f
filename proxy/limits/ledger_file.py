"""The embedded ledger's file: without Redis, the memory store's ledger rows (every
LEDGER_FIELDS count, split by key) are kept in a SQLite file, so that a restart loses
nothing and a SIGKILL at most the last ``accounting.ledger_interval``.

Nothing here runs on a call's path: settlements change the memory store only
(limits/memory.py); ``LedgerKeeper`` (limits/ledger_keeper.py) adds what they added
since its last write to the file's rows, every interval and once more at shutdown,
through this module's calls in a thread of its own (a commit waits for the disk).

A write adds to the rows, never sets them: so every process that writes the file (the
workers of ``--workers N``, an old and a new proxy of a rolling restart) adds its own
calls, and the rows hold the sum of them all. At start a process reads the rows of the
last ``RESTORE_DAYS`` into its memory (the budgets and tokens_per_day limits count
them); a read of the ledger (/v1/usage) reads the file. SQLite's WAL lets writers and
readers proceed side by side; a write waits up to ``BUSY_TIMEOUT`` for another's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

from proxy.limits.store import LEDGER_FIELDS, LedgerKey, LedgerRow, StoreUnavailable, ledger_rows

SCHEMA_VERSION = 1  # PRAGMA user_version: a file of another version is refused
BUSY_TIMEOUT = 5.0  # seconds a write waits for another worker's transaction
_ROW = ("team", "model", "day", "key")
RESTORE_DAYS = 62  # read back at start: a monthly budget's whole period, and more
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ledger (
    team TEXT NOT NULL, model TEXT NOT NULL, day INTEGER NOT NULL, key TEXT NOT NULL,
    {", ".join(f"{name} INTEGER NOT NULL" for name in LEDGER_FIELDS)},
    PRIMARY KEY (team, model, day, key)
) WITHOUT ROWID
"""
_COLUMNS = ", ".join(_ROW + LEDGER_FIELDS)
# Adds: a transaction that failed is rolled back whole, and its additions go again.
_UPSERT = (
    f"INSERT INTO ledger ({_COLUMNS}) VALUES ({', '.join('?' * (len(_ROW) + len(LEDGER_FIELDS)))}) "
    f"ON CONFLICT (team, model, day, key) DO UPDATE SET "
    + ", ".join(f"{name} = {name} + excluded.{name}" for name in LEDGER_FIELDS)
)


class LedgerFileError(StoreUnavailable):
    """The file cannot be opened, read or written (its path and SQLite's reason); a read
    that fails is answered as a ledger Redis cannot give (503)."""


class LedgerFile:
    """A process's connection to the ledger file. Its methods block: they are called
    from one thread at a time (LedgerKeeper's executor), never from the event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def open(self, today: int) -> dict[LedgerKey, tuple[int, ...]]:
        """Open (or create) the file and return its rows of the last RESTORE_DAYS days
        up to ``today``. Raises LedgerFileError for a file that is not a ledger, or
        cannot be written."""
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False)
            self._db = db
            db.execute("PRAGMA journal_mode=WAL")  # reads first: a corrupt file fails here
            db.execute("PRAGMA synchronous=FULL")  # each write synced: a power cut keeps it
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, not {SCHEMA_VERSION}")
            with db:  # a write at start: an unwritable file is refused now, not later
                db.execute(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM ledger WHERE day > ?", (today - RESTORE_DAYS,)
            ).fetchall()
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise LedgerFileError(f"ledger file {self.path}: {exc}") from None
        return {(team, model, day, key): tuple(c) for team, model, day, key, *c in rows}

    def add(self, rows: Mapping[LedgerKey, tuple[int, ...]]) -> None:
        """Add ``rows`` to the file's in one transaction: all of them, or none."""
        db = self._connected()
        try:
            with db:
                db.executemany(_UPSERT, [(*key, *counts) for key, counts in rows.items()])
        except sqlite3.Error as exc:
            raise LedgerFileError(f"ledger file {self.path}: {exc}") from None

    def read(self, teams: list[str], first_day: int, last_day: int) -> list[LedgerRow]:
        """The ledger of ``teams``, every process's, as MemoryStore.ledger shapes it."""
        marks = ", ".join("?" * len(teams))
        query = (
            f"SELECT {_COLUMNS} FROM ledger WHERE team IN ({marks}) AND day BETWEEN ? AND ? "
            "ORDER BY team, model, day, key"
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
