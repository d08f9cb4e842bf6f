"""One Redis subscription on a connection of its own: SUBSCRIBE, then its messages.

The circuit sharing follows the other processes' changes here (it once did through
redis-py's PubSub). Cleaning up a PubSub on cancellation takes locks it shares with
its connection pool, and a follower cancelled at shutdown was seen (rarely, in CI) to
stay pending for good: the event loop could then not close, nor the process exit.
Here the subscription is one socket: a cancellation closes it and waits for nothing.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from proxy.redis.client import Address
from proxy.redis.protocol import Parser, Reply, RespError, encode


class Subscription:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._parser = Parser()
        self._replies: deque[Reply] = deque()

    @classmethod
    async def open(cls, address: Address | str, channel: str, within: float) -> Subscription:
        """Connected, authenticated and subscribed to ``channel``, in ``within`` seconds."""
        if isinstance(address, str):
            address = Address.from_url(address)
        async with asyncio.timeout(within):
            subscription = cls(*await _dial(address))
            try:
                commands = [*address.handshake(), ("SUBSCRIBE", channel)]
                subscription._writer.write(b"".join(encode(c) for c in commands))
                for _ in commands:  # OK for AUTH and SELECT, then the confirmation
                    await subscription._next()
            except BaseException:
                subscription.close()
                raise
        return subscription

    async def message(self) -> bytes:
        """The payload of the next message published to the channel."""
        while True:
            reply = await self._next()
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                payload = reply[2]
                if isinstance(payload, bytes):
                    return payload

    async def _next(self) -> Reply:
        while not self._replies:
            data = await self._reader.read(1 << 16)
            if not data:
                raise ConnectionError("Redis closed the subscription's connection")
            self._replies.extend(self._parser.feed(data))  # ProtocolError: not RESP
        reply = self._replies.popleft()
        if isinstance(reply, RespError):
            raise reply
        return reply

    def close(self) -> None:
        self._writer.close()


async def _dial(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.path:
        return await asyncio.open_unix_connection(address.path)
    tls = ssl.create_default_context() if address.tls else None
    return await asyncio.open_connection(address.host, address.port, ssl=tls)
