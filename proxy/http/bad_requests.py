"""What aiohttp's server logs about a malformed request: one short line, no client bytes.

aiohttp logs a request its parser refuses as "Error handling request" with a traceback
whose exception message quotes the raw head, ``Authorization`` line included, ten lines a
request. The proxy gives aiohttp's server a logger of its own (the ``logger`` argument
of its request handlers) whose filter rewrites those records into ``bad request from
ADDRESS: REASON``, the reason being the parser's fixed wording only, and lets at most
``LINES_PER_SECOND`` of them through a second, saying how many it left out. Any other
record (a handler's own error: a bug, not client input) passes unchanged.
"""

from __future__ import annotations

import logging
import re
import time

from aiohttp.http_exceptions import HttpProcessingError

# A flood of bad requests must not become a flood of log lines.
LINES_PER_SECOND = 10
# aiohttp's wording for a request its parser refused (web_protocol.RequestHandler.handle_error).
_REFUSED = "Error handling request from %s"
# A line of a parser's message that is its own wording, not a quote of client bytes
# (those are quoted as b'...', which this never matches).
_WORDING = re.compile(r"[A-Za-z][A-Za-z0-9 -]*:?")


class BadRequestLines(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.second = 0
        self.lines = 0  # this second's
        self.left_out = 0  # since the last line let through

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.msg != _REFUSED or not isinstance(exc, HttpProcessingError):
            return True
        now = int(time.monotonic())
        if now != self.second:
            self.second, self.lines = now, 0
        if self.lines >= LINES_PER_SECOND:
            self.left_out += 1
            return False
        self.lines += 1
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        args: tuple[object, ...] = (remote, _reason(exc))
        record.msg = "bad request from %s: %s"
        if self.left_out:
            record.msg += " (%d more bad requests not logged)"
            args += (self.left_out,)
            self.left_out = 0
        record.args = args
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _reason(exc: HttpProcessingError) -> str:
    """The parser's words for what is wrong, without the bytes it quotes."""
    words = []
    for line in (exc.message or "").splitlines():
        line = line.strip()
        if not line:
            continue
        if not _WORDING.fullmatch(line):
            break
        words.append(line.rstrip(":"))
    return type(exc).__name__ + (f" ({': '.join(words)})" if words else "")


def server_logger() -> logging.Logger:
    """The logger for aiohttp's request handlers, its filter installed once."""
    logger = logging.getLogger("proxy.http")
    if not any(isinstance(f, BadRequestLines) for f in logger.filters):
        logger.addFilter(BadRequestLines())
    return logger
