"""Instructions per request, counted by callgrind: the figure that machine noise cannot move.

Wall-clock figures on a shared 2-core machine swing by a third from one run to the
next, CPU time per request less but still visibly. callgrind counts the instructions
the serving process executes (user space only: system calls' kernel time is not in
it), the same for the same code and inputs whatever else the machine is doing. The
server runs under ``valgrind --tool=callgrind`` twice, answering ``few`` and then
``many`` sequential requests on one keep-alive connection; the difference over the
difference in requests cancels start-up and shutdown out.
"""

from __future__ import annotations

import http.client
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.procs import ROOT, free_port, healthy, wait_for

# The server's command line for a port.
Argv = Callable[[int], list[str]]


def have_valgrind() -> bool:
    return shutil.which("valgrind") is not None


def per_request(
    argv: Argv, body: bytes, headers: dict[str, str], tmp: Path, few: int = 200, many: int = 1200
) -> float:
    """Instructions per request, in thousands."""
    low = _count(argv, body, headers, tmp / "callgrind.few", few)
    high = _count(argv, body, headers, tmp / "callgrind.many", many)
    return (high - low) / (many - few) / 1000


def _count(argv: Argv, body: bytes, headers: dict[str, str], out: Path, requests: int) -> int:
    port = free_port()
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv(port)]
    server = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # Imports under valgrind take a while.
        wait_for(lambda: healthy(port), "the server under valgrind", timeout=180.0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(requests):
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"callgrind run: status {answer.status}")
        conn.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    return _total(out)


def _total(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")
