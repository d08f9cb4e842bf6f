"""``python -m proxy usage``: the ledger of a running proxy, as a table."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from proxy.limits.store import LEDGER_FIELDS

_COLUMNS = ("date", "team", "model", *LEDGER_FIELDS)
ADMIN_KEY_ENV = "PROXY_ADMIN_KEY"
_KEY_HINT = (
    f"the ledger needs routes.yaml's admin_key: pass it with --admin-key KEY or {ADMIN_KEY_ENV}=KEY"
)


def _said(exc: urllib.error.HTTPError) -> str:
    """The error's message from the proxy's OpenAI-shaped body, else the body."""
    body = exc.read().decode(errors="replace")
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body


def show_usage(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("team", args.team), ("from", args.first), ("to", args.last)) if v}
    url = f"{args.url.rstrip('/')}/v1/usage?{urllib.parse.urlencode(query)}"
    key = args.admin_key if args.admin_key is not None else os.environ.get(ADMIN_KEY_ENV, "")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            report = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"{url}: HTTP {exc.code}: {_said(exc)}", file=sys.stderr)
        if exc.code in (401, 403):
            print(_KEY_HINT, file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        where = f"cannot reach the proxy at {args.url}: {reason} (--url says where it runs)"
        print(where, file=sys.stderr)
        return 1
    print(_table(report))
    return 0


def _table(report: dict[str, Any]) -> str:
    rows = [[str(row[c]) for c in _COLUMNS] for row in report["data"]]
    rows.append(["total", "", "", *(str(report["totals"][f]) for f in LEDGER_FIELDS)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
