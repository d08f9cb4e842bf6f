"""RESP2, the Redis wire format: commands out, replies in, nothing else.

Commands are arrays of bulk strings. Replies are parsed incrementally: ``Parser.feed``
takes whatever one socket read brought (half a reply, or many) and returns the
replies it completes, keeping the rest for the next read. A partial reply is parsed
again from its start when more bytes come; the limiter's replies are a few hundred
bytes, so that costs less than keeping a resumable parser state would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

Arg: TypeAlias = bytes | str | int | float
# Simple strings are str, bulk strings bytes, nulls None; an error inside an array is a
# RespError value.
Reply: TypeAlias = "bytes | str | int | RespError | list[Reply] | None"


class RespError(Exception):
    """An error reply (``-ERR …``, ``-NOSCRIPT …``): the command failed, the connection
    is fine. Inside an array it is a value; as a whole reply it is raised."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ProtocolError(Exception):
    """The bytes are not RESP2: the stream cannot be trusted any more."""


def encode(args: Sequence[Arg]) -> bytes:
    return b"*%d\r\n" % len(args) + encode_items(args)


def encode_items(args: Iterable[Arg]) -> bytes:
    """The bulk strings of ``args`` without the array's header: the parts of a command
    that are the same on every call can be encoded once, and joined to the rest."""
    parts = []
    for arg in args:
        # Exact types first (the limiter's arguments are all str, int or float; this
        # runs for every argument of every call), subclasses through isinstance.
        kind = type(arg)
        if kind is str:
            data = arg.encode()  # type: ignore[union-attr]
        elif kind is int or kind is float:
            data = str(arg).encode()  # a float's str is the shortest that reads back
        else:
            data = _other(arg)
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


@dataclass(frozen=True)
class Script:
    body: bytes
    sha: str
    # A call's first two elements, encoded: EVALSHA and the digest, or EVAL and the body.
    by_sha: bytes
    by_body: bytes

    @classmethod
    def of(cls, text: str) -> Script:
        body = text.encode()
        sha = hashlib.sha1(body, usedforsecurity=False).hexdigest()
        return cls(body, sha, encode_items(("EVALSHA", sha)), encode_items(("EVAL", body)))


def _other(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):  # an int, but "True" is never what a caller meant
        raise TypeError("bool is not a Redis argument; send 0 or 1")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    raise TypeError(f"{type(arg).__name__} is not a Redis argument")


class Parser:
    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[Reply]:
        buf = self._rest + data if self._rest else data
        replies: list[Reply] = []
        pos, end = 0, len(buf)
        while pos < end:
            parsed = _parse(buf, pos)
            if parsed is None:
                break
            reply, pos = parsed
            replies.append(reply)
        self._rest = buf[pos:]
        return replies


def _parse(buf: bytes, pos: int) -> tuple[Reply, int] | None:
    """One reply starting at ``pos`` and the position after it; None if incomplete."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    kind, line, pos = buf[pos], buf[pos + 1 : eol], eol + 2
    try:
        if kind == 0x24:  # $ bulk string
            size = int(line)
            if size < 0:
                return None, pos
            if len(buf) < pos + size + 2:
                return None
            return buf[pos : pos + size], pos + size + 2
        if kind == 0x2A:  # * array
            return _array(buf, pos, int(line))
        if kind == 0x3A:  # : integer
            return int(line), pos
    except ValueError:
        raise ProtocolError(f"bad length or integer: {line!r}") from None
    if kind == 0x2B:  # + simple string
        return line.decode(), pos
    if kind == 0x2D:  # - error
        return RespError(line.decode(errors="replace")), pos
    raise ProtocolError(f"unknown reply type {bytes([kind])!r}")


def _array(buf: bytes, pos: int, count: int) -> tuple[Reply, int] | None:
    if count < 0:
        return None, pos
    items: list[Reply] = []
    for _ in range(count):
        parsed = _parse(buf, pos)
        if parsed is None:
            return None
        item, pos = parsed
        items.append(item)
    return items, pos
