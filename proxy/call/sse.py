"""Reads an SSE stream beside the bytes: the usage chunk, and how many events passed.

The bytes the client gets are the upstream's. The one exception: when the proxy itself
asked the upstream for ``stream_options.include_usage`` (to bill exactly), it removes
again what that request added, the usage-only chunk and the ``"usage": null`` member
some upstreams then put in every chunk, so that the client's stream is what it would
have been without the proxy. To do that it forwards whole events; otherwise it forwards
every chunk the moment it arrives and only looks at a copy.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy.limits.usage import Usage, reported

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null')
_MAX_PENDING = 1 << 20  # an "event" this long without an end is not SSE; stop holding it


class SseTap:
    def __init__(self, strip_usage: bool):
        self.strip_usage = strip_usage
        self.usage: Usage | None = None
        self.data_events = 0
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take a chunk from the upstream; return the bytes to send to the client now."""
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            out = self._events(data)
        else:  # every provider seen ends events with LF only: split, no regex
            *events, self._pending = data.split(b"\n\n")
            out = [self._event(event + b"\n\n") for event in events]
        if not self.strip_usage:
            return chunk
        if len(self._pending) > _MAX_PENDING:
            out.append(self._pending)
            self._pending = b""
        return b"".join(out)

    def _events(self, data: bytes) -> list[bytes]:
        """Split at any of SSE's three line-end pairs; keep the unfinished rest pending."""
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(data):
            out.append(self._event(data[start : match.end()]))
            start = match.end()
        self._pending = data[start:]
        return out

    def finish(self) -> bytes:
        """The bytes still held when the upstream ends (an event without its blank line)."""
        tail, self._pending = self._pending, b""
        if tail:
            kept = self._event(tail)
            return kept if self.strip_usage else b""
        return b""

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:") or event.startswith(b"data: [DONE]"):
            return event
        self.data_events += 1
        if b'"usage"' not in event:
            return event
        payload = _payload(event)
        usage = reported(payload)
        if usage is not None:
            self.usage = usage
            if self.strip_usage and payload.get("choices") == []:
                return b""  # the chunk the proxy asked for; the client did not
        return _NULL_USAGE.sub(b"", event) if self.strip_usage else event

    def estimated_completion(self) -> int:
        """About one token per streamed event, less the role and finish events."""
        return max(0, self.data_events - 2)


def _payload(event: bytes) -> dict[str, Any]:
    lines = [line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")]
    try:
        payload = json.loads(b"\n".join(lines))
    except (ValueError, RecursionError):  # JSON nested thousands deep: no usage in it
        return {}
    return payload if isinstance(payload, dict) else {}
