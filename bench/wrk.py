"""Plain requests through wrk (Debian's ``wrk``): a closed loop of N connections.

A Lua script sets the POST body and headers and prints wrk's own summary as one JSON
line at the end (latency percentiles in microseconds, requests, errors), so nothing
is scraped from wrk's human-readable output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "wrk is missing: apt-get update && apt-get install -y wrk"

BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    },
    separators=(",", ":"),
)

_SCRIPT = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
%(auth)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%%d,"duration_us":%%d,"errors":%%d,"non2xx":%%d,' ..
    '"p50":%%d,"p90":%%d,"p99":%%d,"mean":%%f}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int
    non2xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def require_wrk() -> str:
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit(INSTALL_HINT)
    return binary


def write_script(directory: Path, key: str | None) -> Path:
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    path = directory / ("load-auth.lua" if key else "load.lua")
    path.write_text(_SCRIPT % {"body": json.dumps(BODY), "auth": auth})
    return path


def run_wrk(
    url: str,
    script: Path,
    connections: int,
    seconds: float,
    during: Callable[[], None] | None = None,
) -> WrkResult:
    """One wrk thread: on two cores, a second one would take CPU from what is measured.
    ``during`` runs once, half-way through the run (to sample memory under load)."""
    whole = f"-d{max(1, round(seconds))}s"  # wrk takes whole seconds
    command = [
        require_wrk(),
        "-t1",
        f"-c{connections}",
        whole,
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        if during is not None:
            time.sleep(seconds / 2)
            during()
        stdout, stderr = p.communicate(timeout=seconds + 60)
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            return _result(json.loads(line[len("BENCH ") :]))
    raise RuntimeError(f"wrk printed no summary: {stdout}\n{stderr}")


def _result(raw: dict[str, float]) -> WrkResult:
    return WrkResult(
        requests=int(raw["requests"]),
        seconds=raw["duration_us"] / 1e6,
        errors=int(raw["errors"]),
        non2xx=int(raw["non2xx"]),
        p50_ms=raw["p50"] / 1000,
        p90_ms=raw["p90"] / 1000,
        p99_ms=raw["p99"] / 1000,
        mean_ms=raw["mean"] / 1000,
    )
