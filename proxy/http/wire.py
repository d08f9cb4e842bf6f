"""The front's HTTP/1.1: read an ordinary request head, write an answer's head.

"Ordinary" is deliberately narrow: ``POST`` to a proxied path, ``HTTP/1.1``, header
lines of token names and printable ASCII values, one Host, one Content-Length of at most
18 decimal digits, and no Transfer-Encoding, Expect or Upgrade. One regular expression
checks a whole head.
Anything else is not parsed more leniently here: it is left to aiohttp's parser
(proxy/http/front.py hands it the connection), so the two can never frame a request
differently.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

from multidict import CIMultiDict

# A head longer than this is left to aiohttp, which enforces its own line limits.
MAX_HEAD = 8190

_HEAD = re.compile(
    r"POST (/v1/(?:chat/completions|completions|embeddings)) HTTP/1\.1\r\n"
    r"((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e]*\r\n)*)\r\n"
)
# Bytes no head the front takes can hold before its blank line: a bare LF, a CR not
# before an LF, a control character, a byte beyond ASCII. A partial head that holds one
# goes to aiohttp at once, which answers 400 at once, rather than waiting for a CRLF
# blank line that may never come.
_NEVER_ORDINARY = re.compile(rb"[^\t\r\n\x20-\x7e]|(?<!\r)\n|\r(?!\n|\Z)")
# A longer Content-Length is left to aiohttp's parser (no int() of thousands of digits,
# nor of more than 64 bits, which aiohttp refuses).
_LENGTH_DIGITS = 18
# Their presence makes a request something the front leaves to aiohttp.
_NOT_ORDINARY = ("Transfer-Encoding", "Expect", "Upgrade")
# Set by the writer for every answer, whatever the answer's headers say.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "date"})


@dataclass(frozen=True)
class Head:
    path: str
    headers: CIMultiDict[str]
    length: int  # the body's Content-Length
    size: int  # bytes of the head, its blank line included
    keep_alive: bool


def read_head(buffer: bytearray) -> Head | None:
    """The ordinary request head at the start of ``buffer`` (whole: its blank line is
    in), or None if the request is not ordinary."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD:
        return None
    match = _HEAD.fullmatch(buffer[: end + 4].decode("latin-1"))
    if match is None:
        return None
    headers: CIMultiDict[str] = CIMultiDict()
    for line in match[2].split("\r\n")[:-1]:
        name, _, value = line.partition(":")
        headers.add(name, value.strip(" \t"))
    lengths = headers.getall("Content-Length", ())
    # isdigit() is true of ASCII digits only here: the head's values are printable ASCII.
    if len(lengths) != 1 or len(lengths[0]) > _LENGTH_DIGITS or not lengths[0].isdigit():
        return None
    if any(h in headers for h in _NOT_ORDINARY):
        return None
    if len(headers.getall("Host", ())) != 1:  # RFC 9112 §3.2: aiohttp answers 400
        return None
    connection = headers.get("Connection", "").lower()
    if "upgrade" in connection:
        return None
    return Head(match[1], headers, int(lengths[0]), end + 4, "close" not in connection)


def complete(buffer: bytearray) -> bool:
    """Whether ``buffer`` holds a whole head, or enough of one to know that it is not
    ordinary."""
    if buffer.find(b"\r\n\r\n") >= 0 or len(buffer) > MAX_HEAD:
        return True
    return _NEVER_ORDINARY.search(buffer) is not None


class HeadWriter:
    """Answer heads, with a Date that is formatted once a second and status lines made
    once per status, not once a call."""

    __slots__ = ("_date", "_second", "_status_lines")

    def __init__(self) -> None:
        self._second = -1
        self._date = ""
        self._status_lines: dict[int, str] = {}

    def head(
        self, status: int, headers: CIMultiDict[str], length: int | None, keep_alive: bool
    ) -> bytes:
        """``length`` None: a chunked body follows."""
        status_line = self._status_lines.get(status)
        if status_line is None:
            status_line = self._status_lines[status] = f"HTTP/1.1 {status} {_reason(status)}"
        lines = [status_line]
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in _FRAMING]
        if "Content-Type" not in headers:
            lines.append("Content-Type: application/octet-stream")  # as aiohttp does
        if length is None:
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {length}")
        if not keep_alive:
            lines.append("Connection: close")
        lines.append(f"Date: {self._now()}\r\n\r\n")
        text = "\r\n".join(lines)
        # A header value with a line break would let a value forge headers.
        if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
            raise ValueError("a header name or value holds a line break")
        return text.encode("utf-8")

    def _now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second, self._date = second, formatdate(second, usegmt=True)
        return self._date


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
