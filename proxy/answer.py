"""The proxy's own answer to a call, whole: what either server writes to the client.

The call path builds these (a relayed upstream answer, an error in the OpenAI shape);
only the servers in http/ turn them into bytes on the wire or aiohttp's web.Response.
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDict


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: CIMultiDict[str]  # the server adds the framing headers and Date
    body: bytes
