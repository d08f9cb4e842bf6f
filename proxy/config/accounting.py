"""The ``accounting`` section of routes.yaml: reservations, and where the embedded
ledger is kept (proxy/limits/ledger_file.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.config.fields import FieldReader
from proxy.config.model import Accounting

ACCOUNTING_FIELDS = {"default_max_tokens": "count", "ledger_interval": "duration"}
ACCOUNTING_KEYS = {"ledger_path", *ACCOUNTING_FIELDS}
STATE_DIR_ENV = "PROXY_STATE_DIR"  # where the ledger file goes by default (the image sets it)
LEDGER_FILE = "ledger.sqlite3"


def read_accounting(reader: FieldReader, raw: Any, source: str = "") -> Accounting:
    """``source``: the routes file's path, which a relative ``ledger_path`` (and the
    default, without ``PROXY_STATE_DIR``) is beside; empty for a config not read from a
    file, which keeps its ledger in memory unless it names an absolute path."""
    node = reader.mapping(raw or {}, "accounting", ACCOUNTING_KEYS)
    numbers = {k: v for k, v in node.items() if k in ACCOUNTING_FIELDS}
    fields = reader.fields(numbers, "accounting", ACCOUNTING_FIELDS)
    path = _ledger_path(reader, node, source)
    return replace(Accounting(), ledger_path=path, **fields)


def _ledger_path(reader: FieldReader, node: dict[str, Any], source: str) -> str | None:
    if "ledger_path" in node and node["ledger_path"] is None:
        return None  # null: off, the ledger lives in memory only (lost on restart)
    base = Path(source).parent if source else None
    if "ledger_path" not in node:
        state = reader.env.get(STATE_DIR_ENV, "")
        if state:
            return str(Path(state) / LEDGER_FILE)
        return None if base is None else str(base / LEDGER_FILE)
    text = reader.string(node["ledger_path"], "accounting.ledger_path")
    if text is None:
        return None
    path = Path(text).expanduser()
    if not path.is_absolute():
        if base is None:
            reader.error("accounting.ledger_path", "must be absolute when not read from a file")
            return None
        path = base / path
    return str(path)
