"""``python -m proxy usage``: the ledger of a running proxy, as a table."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from proxy.limits.store import LEDGER_FIELDS

_COLUMNS = ("date", "team", "model", *LEDGER_FIELDS)


def show_usage(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("team", args.team), ("from", args.first), ("to", args.last)) if v}
    url = f"{args.url.rstrip('/')}/v1/usage?{urllib.parse.urlencode(query)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {args.admin_key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            report = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"{url}: {exc.reason}", file=sys.stderr)
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
