"""Answers read off a raw connection, for tests that write their requests byte by byte."""

from __future__ import annotations

import asyncio

Answer = tuple[int, dict[str, str], bytes]


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """The next answer: status, headers (names lower-cased), body (de-chunked)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.rstrip("\r\n").split("\r\n")
    status = int(status_line.split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if status < 200:  # 100 Continue: a head alone
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readexactly(2)
    return status, headers, b"".join(parts)
