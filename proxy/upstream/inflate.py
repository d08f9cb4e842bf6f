"""A gzip or deflate body inflated a piece at a time, only while its reader takes them.

The proxy asks upstreams for identity, but decodes a body that comes compressed anyway.
Inflated whole, one read of 64 KiB of gzip can be 64 MiB of zeros (a decompression
bomb), past any back-pressure or limit: here a piece is at most ``PIECE`` bytes, and
whatever the reader cannot take yet waits still compressed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

PIECE = 256 * 1024


class Inflater:
    __slots__ = ("_backlog", "_decoder", "ended", "finished")

    def __init__(self) -> None:
        self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or a zlib header
        self._backlog = b""  # received, not inflated yet
        self.ended = False  # the whole body is in (some of it may wait in the backlog)
        self.finished = False  # and all of it was inflated

    def feed(self, data: bytes) -> None:
        self._backlog = self._backlog + data if self._backlog else data

    def pieces(self, more: Callable[[], bool]) -> Iterator[bytes]:
        """Inflate the backlog while ``more()`` holds (asked before each piece); once the
        body has ended and nothing waits, what zlib still holds comes last, and the
        inflater is ``finished``. Raises zlib.error for a body that does not inflate."""
        while self._backlog and more():
            piece = self._decoder.decompress(self._backlog, PIECE)
            self._backlog = self._decoder.unconsumed_tail
            if piece:  # never b"": a read of b"" is the body's end
                yield piece
        if self.ended and not self._backlog and not self.finished:
            self.finished = True
            if rest := self._decoder.flush():
                yield rest
