"""Where the access log's lines go: a logging handler that writes them as bare JSON lines,
gathered for up to 50 ms (or one 4 KiB block) and written together.

One line per call is the busiest log of the proxy. Written through the root handler, a
line cost a formatted prefix (time, pid, level, logger) and a write and flush of its
own; measured, the access log was a sixth of the proxy's instructions per call. Here a
line is the message alone (its JSON has its own "ts"), and lines leave in writes of
whole lines, each at most PIPE_BUF bytes so that the lines of several workers sharing
one stderr pipe never interleave mid-line. Gathering per loop turn was not enough: at
concurrency 1 a turn holds one call, so every call paid a write system call of its own
(the largest single cost left in the call's profile after the two socket writes). Like
nginx's ``access_log ... buffer= flush=``, lines now wait until a block is full or
``FLUSH_AFTER`` has passed; shutdown writes what is left.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from proxy.observe.flush_later import FlushLater

# POSIX: a write of at most PIPE_BUF bytes to a pipe is atomic. Linux's is 4096.
_ATOMIC = 4096
# The longest a line waits for others to share its write.
FLUSH_AFTER = 0.05

# json.dumps makes a new C encoder on every call (in JSONEncoder.iterencode), a twentieth
# of a call's samples under load. One made once gives the same text (json.dumps's
# separators and escaping; markers=None only skips the circular-reference check, and a
# log line is a tree).
_C_ENCODER = json.encoder.c_make_encoder  # type: ignore[attr-defined]
_ENCODER = None
if _C_ENCODER is not None:
    # markers, default, string encoder, indent, separators, sort_keys, skipkeys, allow_nan
    _ENCODER = _C_ENCODER(
        None, None, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )


# A client's model id is logged as sent, up to this many characters: it is bounded only
# by the body's size, and one call must not write a megabyte of log.
MODEL_CHARS = 256


def logged_model(model: str | None) -> str | None:
    """The model id for the log line; a longer one cut, and marked with its length."""
    if model is None or len(model) <= MODEL_CHARS:
        return model
    return f"{model[:MODEL_CHARS]}...[truncated, {len(model)} chars]"


def encode(line: dict[str, Any]) -> str:
    """``json.dumps(line)`` for a line of strings, numbers, None, lists and dicts."""
    if _ENCODER is None:  # pragma: no cover - CPython always has the C encoder
        return json.dumps(line)
    return "".join(_ENCODER(line, 0))


class AccessLogHandler(logging.Handler):
    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream
        self._lines: list[str] = []
        self._size = 0  # bytes gathered in _lines, newlines included
        self._later = FlushLater(FLUSH_AFTER, self.flush)

    def handle(self, record: logging.LogRecord) -> bool:
        # No filters, no formatter, no lock: one thread writes, and the message is the line.
        self.add(record.getMessage())
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1  # JSON with ensure_ascii: one byte per character
        if self._size >= _ATOMIC:
            self.flush()
        else:
            self._later.request()

    def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines, self._size = self._lines, [], 0
        stream = self._stream or sys.stderr  # looked up late: tests swap sys.stderr
        for block in _blocks(lines):
            stream.write(block)
        stream.flush()


def _blocks(lines: list[str]) -> list[str]:
    """The lines joined into blocks of whole lines, each at most _ATOMIC bytes long
    (a longer line is a block of its own)."""
    blocks: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        length = len(line) + 1  # JSON with ensure_ascii: one byte per character
        if current and size + length > _ATOMIC:
            blocks.append("".join(current))
            current, size = [], 0
        current.append(line + "\n")
        size += length
    if current:
        blocks.append("".join(current))
    return blocks


_LOGGER = logging.getLogger("proxy.access")


def write(line: str) -> None:
    """One access line. When this module's handler is the logger's only one (as ``serve``
    sets it up), straight to it: building a LogRecord was a third of the line's cost.
    Otherwise (a test's caplog, handlers an embedder added) through logging."""
    handlers = _LOGGER.handlers
    if len(handlers) == 1 and not _LOGGER.propagate and type(handlers[0]) is AccessLogHandler:
        handlers[0].add(line)
    else:
        _LOGGER.info(line)


def install(level: int) -> None:
    """Send the ``proxy.access`` logger's lines to stderr through this handler only."""
    _LOGGER.addHandler(AccessLogHandler())
    _LOGGER.propagate = False
    _LOGGER.setLevel(level)


def flush() -> None:
    """Write what the current loop turn gathered: a worker's last lines must not wait
    for a turn that never comes (forked workers leave with os._exit, without logging's
    own shutdown flush)."""
    for handler in _LOGGER.handlers:
        handler.flush()
