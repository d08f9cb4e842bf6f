"""One flush a short while after the first of many updates: the access log's lines and
the metrics tally gather this way, so that a call does not pay a write of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class FlushLater:
    """Calls ``flush`` ``delay`` seconds after the first ``request()`` since the last
    call; at once where no event loop runs (a command, shutdown, a synchronous test)."""

    __slots__ = ("_delay", "_flush", "_scheduled")

    def __init__(self, delay: float, flush: Callable[[], None]) -> None:
        self._delay, self._flush = delay, flush
        self._scheduled = False

    def request(self) -> None:
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop().call_later(self._delay, self._due)
            self._scheduled = True
        except RuntimeError:  # no loop running: now
            self._flush()

    def _due(self) -> None:
        self._scheduled = False
        self._flush()
