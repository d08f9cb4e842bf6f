"""A TCP relay in front of a test's redis-server that the test can make fail.

Faults a killed redis-server cannot stage: a connection that is open when a command is
written on it and fails only then (``cut``), or one that takes commands and never
answers (``black_hole``)."""

from __future__ import annotations

import asyncio
import contextlib


class RedisRelay:
    def __init__(self, port: int) -> None:
        self.port = port  # the real redis-server's
        self.cut = False  # the next data a client sends closes its connection, unsent
        self.black_hole = False  # the next data a client sends is swallowed, unanswered
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    def heal(self) -> None:
        """Back to relaying, and every connection open now closed, the swallowing ones too."""
        self.cut = self.black_hole = False
        for writer in list(self._writers):
            writer.close()

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers |= {writer, up_writer}
        back = asyncio.ensure_future(_pump(up_reader, writer))
        try:
            while data := await reader.read(65536):
                if self.cut:
                    break
                if not self.black_hole:
                    up_writer.write(data)
        except OSError:
            pass
        finally:
            back.cancel()
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
