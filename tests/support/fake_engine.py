"""A fake local engine: ``python tests/support/fake_engine.py --port N [options]``, a real HTTP
server process for the engine supervisor's tests (llama.cpp takes seconds to start).

It answers 200 on /health, on /metrics one counter, ``fake_engine_calls_total 42``, and
a chat completion to any POST, whose usage is 100 prompt and 10 completion tokens.
``--lives FILE``: each start takes the first line of FILE (and rewrites FILE without it)
as the seconds this run lives before it exits with code 3, 0 meaning before it ever
listens; with FILE empty it serves until stopped. ``--ignore-sigterm``: SIGTERM is
printed and ignored. ``--delay S``: each POST is answered after S seconds (a call
that holds a slot); ``--hold-long S``: a call whose last message starts with "long" is
held S seconds instead. ``--log FILE``: the last message's content of each POST is
appended to FILE, one a line, when the call arrives (the order the engine saw).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

METRICS = (
    b"# HELP fake_engine_calls_total Calls.\n# TYPE fake_engine_calls_total counter\n"
    b"fake_engine_calls_total 42\n"
)
ANSWER = (
    b'{"id": "fake", "object": "chat.completion", "choices": [{"index": 0, "message": '
    b'{"role": "assistant", "content": "ok"}, "finish_reason": "stop"}], '
    b'"usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}'
)


class Handler(BaseHTTPRequestHandler):
    delay = 0.0
    hold_long = 0.0
    log: Path | None = None
    lock = threading.Lock()

    def do_GET(self) -> None:
        body = {"/health": b"ok", "/metrics": METRICS}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        messages = json.loads(body or b"{}").get("messages") or [{}]
        content = str(messages[-1].get("content", ""))
        if self.log is not None:
            with self.lock, self.log.open("a") as out:
                out.write(f"{content}\n")
        time.sleep(self.hold_long if content.startswith("long") else self.delay)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the proxy logs every line of ours: keep it to the events below


def _next_life(path: Path) -> float | None:
    lines = path.read_text().split()
    if not lines:
        return None
    path.write_text("\n".join(lines[1:]))
    return float(lines[0])


def _ignore(signum: int, frame: FrameType | None) -> None:
    print("fake engine: SIGTERM ignored", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--lives", type=Path)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--hold-long", type=float, default=0.0)
    parser.add_argument("--log", type=Path)
    args = parser.parse_args()
    Handler.delay, Handler.hold_long, Handler.log = args.delay, args.hold_long, args.log
    life = _next_life(args.lives) if args.lives else None
    if life == 0:
        return 3
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, _ignore)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if life is not None:
        threading.Timer(life, server.shutdown).start()
    print("fake engine: serving", flush=True)
    server.serve_forever()
    return 3


if __name__ == "__main__":
    sys.exit(main())
