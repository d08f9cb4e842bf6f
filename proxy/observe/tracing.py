"""OpenTelemetry traces, the door: opened only when routes.yaml has ``telemetry:``.

This module imports nothing from OpenTelemetry, so that a proxy without traces loads
none of it: ``open_tracing`` imports ``spans.py``, which does. What the call path hands
the spans is in ``span_facts.py``, for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING

from proxy.config.telemetry import Telemetry

if TYPE_CHECKING:
    from proxy.observe.spans import Tracing


def open_tracing(settings: Telemetry, version: str) -> Tracing:
    from proxy.observe.spans import Tracing  # here, not above: only with telemetry on

    return Tracing(settings, version)


async def close_tracing(tracing: Tracing) -> None:
    """Flush the spans not yet exported, and stop. The exporter posts with a blocking
    HTTP client, so the flush runs in a thread of its own while the loop goes on (a
    collector in this process, as in the tests, can answer); a daemon thread, so that
    a collector that never answers cannot hold the process's exit."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def flush() -> None:
        try:
            tracing.shutdown()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(_settle, done)

    threading.Thread(target=flush, name="trace flush", daemon=True).start()
    await done


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
