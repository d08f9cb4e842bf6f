"""The proxy's Redis client: lean and pipelined, built for the limiter's hot path
(admit, settle, renew) and used for every other command too (ledger reads, circuit
sharing).

redis-py spends a few hundred µs of CPU per script call; this client does only what
the hot path needs. One persistent connection per client, shared by every concurrent
caller: each command is written at once and replies are matched to callers in order
(pipelining). Scripts run by EVALSHA, with EVAL after a NOSCRIPT (a restarted Redis
has lost its script cache); calls to one script can be gathered per loop turn into one
command (``run_batched``, redis/batch.py).

A command fails with ``RespError`` (Redis refused it; the connection is fine) or
``Disconnected`` (no connection, the socket broke, or the oldest reply is overdue). A
broken connection fails every command waiting on it, because their replies can no
longer be matched; the next command opens a new one. Nothing is retried here.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qs, unquote, urlsplit

from proxy.redis.batch import Batch, BatchShape, Receiver
from proxy.redis.protocol import (
    Arg,
    Parser,
    ProtocolError,
    Reply,
    RespError,
    Script,
    encode,
    encode_items,
)


class Disconnected(ConnectionError):
    """The command's connection is gone (or never came); its outcome is unknown."""


@dataclass(frozen=True)
class Address:
    host: str = "localhost"
    port: int = 6379
    path: str = ""  # a unix socket, instead of host and port
    tls: bool = False
    username: str = ""
    password: str = ""
    db: int = 0

    @classmethod
    def from_url(cls, url: str) -> Address:
        """redis://[[user]:password@]host[:port][/db], rediss://… (TLS) or
        unix://[[user]:password@]/path/to/socket[?db=N], as redis-py reads them."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"Redis URL must start with redis://, rediss:// or unix://: {url!r}")
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        unix = parts.scheme == "unix"
        db = query.get("db") or ("" if unix else parts.path.strip("/")) or "0"
        return cls(
            host=unquote(parts.hostname or "localhost"),
            port=parts.port or 6379,
            path=unquote(parts.path) if unix else "",
            tls=parts.scheme == "rediss",
            username=unquote(parts.username or ""),
            password=unquote(parts.password or query.get("password", "")),
            db=int(db),
        )

    def handshake(self) -> list[tuple[Arg, ...]]:
        """What a new connection sends before anything else."""
        commands: list[tuple[Arg, ...]] = []
        if self.password:
            user = (self.username,) if self.username else ()
            commands.append(("AUTH", *user, self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


class _Connection(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._parser = Parser()
        self._waiting: deque[tuple[Receiver, float]] = deque()
        # Commands sent in one loop turn leave in one write: under load the calls of a
        # turn share a system call (a loopback write, which also wakes Redis, was the
        # costliest single step of a call with limits on).
        self._unsent: list[bytes | Batch] = []
        # The batch each ordering domain may still add calls to: its last command of
        # this turn, if that is a batch (redis/batch.py).
        self._open: dict[Hashable, Batch] = {}
        # This turn's WAIT, and how many commands were unsent before it: a call whose
        # batch is among them is covered by it (redis/router.py, ledger_replicas).
        self._wait: tuple[asyncio.Future[Reply], int, bytes] | None = None
        # A WAIT written and not answered yet: what is sent meanwhile is held back and
        # leaves, with one WAIT, once it is answered. Written at once, each turn's
        # commands would queue in Redis behind the WAITs before them, each of which may
        # take its whole timeout while a replica lags: a convoy that held settlements
        # (and their concurrency slots) for seconds, and 429s, while a failed primary
        # rejoined as a replica.
        self._held: asyncio.Future[Reply] | None = None
        self._transport: asyncio.Transport | None = None
        # One timer per connection, not one per command: it checks the oldest command's
        # age a few times per timeout while any command waits.
        self._watchdog: asyncio.TimerHandle | None = None
        self.broken: Disconnected | None = None  # once set, never used again
        self.lost: asyncio.Future[None] = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods but not its class.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = self._loop.create_future()
        self.enqueue(command, future)
        return future

    def join(
        self, domain: Hashable, shape: BatchShape, keys: bytes, args: bytes
    ) -> asyncio.Future[Reply]:
        """A script call, in the batch of its domain and shape open in this turn."""
        batch = self._open.get(domain)
        if batch is None or batch.shape is not shape or batch.full():
            batch = self._open[domain] = Batch(shape, self._loop, self.enqueue)
            self.enqueue(batch, batch)
        return batch.add(keys, args)

    def join_confirmed(
        self, domain: Hashable, shape: BatchShape, keys: bytes, args: bytes, wait: bytes
    ) -> tuple[asyncio.Future[Reply], asyncio.Future[Reply]]:
        """``join``, then the ``wait`` command (WAIT n ms) after it: one WAIT per turn
        serves every call whose batch was written before it."""
        reply = self.join(domain, shape, keys, args)
        position = self._unsent.index(self._open[domain])
        if self._wait is None or self._wait[1] <= position or self._wait[2] != wait:
            self._wait = (self.send(wait), len(self._unsent), wait)
        return reply, self._wait[0]

    def ask_next(self) -> None:
        self._open.clear()
        self.send(encode(("ASKING",))).add_done_callback(_ignore)

    def enqueue(self, command: bytes | Batch, receiver: Receiver) -> None:
        if self.broken is not None:
            raise Disconnected(*self.broken.args)
        assert self._transport is not None  # set before the connection is handed out
        self._waiting.append((receiver, self._loop.time()))
        if not self._unsent:
            self._loop.call_soon(self._write)
        self._unsent.append(command)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._timeout / 4, self._watch)

    def _write(self) -> None:
        if self._held is not None:
            return  # sent by _release, with the calls that join it meanwhile
        unsent, self._unsent = self._unsent, []
        self._open.clear()  # what is written takes no more calls
        if self._wait is not None:
            self._held = self._wait[0]
            self._held.add_done_callback(self._release)
        self._wait = None
        if self.broken is None and self._transport is not None:
            self._transport.write(
                b"".join(
                    [
                        c if type(c) is bytes else c.encode()  # type: ignore[union-attr]
                        for c in unsent
                    ]
                )
            )

    def _release(self, _: asyncio.Future[Reply]) -> None:
        self._held = None
        if self._unsent:
            self._write()

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolError as exc:
            return self.abort(f"unreadable reply from Redis: {exc}")
        for reply in replies:
            if not self._waiting:
                return self.abort("a reply from Redis that no command asked for")
            receiver = self._waiting.popleft()[0]
            if receiver.done():  # its caller was cancelled; the reply still had to be read
                continue
            if isinstance(reply, RespError):
                receiver.set_exception(reply)
            else:
                receiver.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection to Redis lost: {exc or 'closed by the server'}")
        self.lost.set_result(None)

    def _watch(self) -> None:
        self._watchdog = None
        if not self._waiting or self.broken is not None:
            return
        if self._loop.time() - self._waiting[0][1] > self._timeout:
            return self.abort(f"no reply from Redis within {self._timeout}s")
        self._watchdog = self._loop.call_later(self._timeout / 4, self._watch)

    def abort(self, why: str) -> None:
        self._fail(why)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._fail("the client was closed")
        if self._transport is not None:
            self._transport.close()

    def _fail(self, why: str) -> None:
        if self.broken is None:
            self.broken = Disconnected(why)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            receiver = self._waiting.popleft()[0]
            if not receiver.done():
                receiver.set_exception(Disconnected(*self.broken.args))


def _ignore(future: asyncio.Future[Reply]) -> None:
    """A reply nobody waits for (ASKING's OK): retrieved, so that no error is logged."""
    if not future.cancelled():
        future.exception()


class RespClient:
    """One Redis node, on one pipelined connection (redis/router.py picks the node)."""

    def __init__(
        self, address: Address | str, timeout: float, scripts: Sequence[Script] = ()
    ) -> None:
        self.address = Address.from_url(address) if isinstance(address, str) else address
        self.timeout = timeout
        # Loaded on every new connection, before any command: a script call then never
        # meets NOSCRIPT in the ordinary course. The EVAL it would take instead leaves a
        # round trip later, after commands sent meanwhile, and a settlement overtaken by
        # the next admission would leave that admission to find the slot still taken.
        self.scripts = tuple(scripts)
        self._connection: _Connection | None = None
        self._opening: asyncio.Task[_Connection] | None = None
        self._closed = False

    async def execute(self, *args: Arg) -> Reply:
        return await self._send(encode(args))

    async def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Reply:
        items = (len(keys), *keys, *args)
        return await self.run_encoded(script, len(items), encode_items(items))

    async def run_encoded(self, script: Script, count: int, items: bytes) -> Reply:
        """A script call whose ``count`` items after the script (numkeys, the keys, the
        arguments) are encoded already (``resp.encode_items``)."""
        head = b"*%d\r\n" % (count + 2)
        try:
            return await self._send(head + script.by_sha + items)
        except RespError as exc:
            if not exc.message.startswith("NOSCRIPT"):
                raise
        # Redis lost its script cache (a restart, SCRIPT FLUSH); EVAL fills it again.
        return await self._send(head + script.by_body + items)

    async def run_batched(
        self, domain: Hashable, shape: BatchShape, keys: bytes, args: bytes
    ) -> Reply:
        """A script call gathered with the calls of ``domain`` to the same script and
        shape made in this loop turn (redis/batch.py); its own reply comes back."""
        connection = self._ready() or await self._connect()
        return await connection.join(domain, shape, keys, args)

    async def run_batched_replicated(
        self, domain: Hashable, shape: BatchShape, keys: bytes, args: bytes, replicas: int, ms: int
    ) -> tuple[Reply, int]:
        """``run_batched``, then ``WAIT replicas ms`` on the same connection in the same
        write: the call's reply, and how many replicas confirmed every write before it."""
        connection = self._ready() or await self._connect()
        wait = encode(("WAIT", replicas, ms))
        reply, acked = connection.join_confirmed(domain, shape, keys, args, wait)
        acked.add_done_callback(_ignore)  # if the call fails, its WAIT is moot
        own = await reply
        confirmed = await acked
        return own, confirmed if isinstance(confirmed, int) else 0

    def join_now(
        self, domain: Hashable, shape: BatchShape, keys: bytes, args: bytes
    ) -> asyncio.Future[Reply] | None:
        """``run_batched`` for a caller that does not wait: the call's reply future, or
        None (nothing sent) when no connection is open; ``run_batched`` opens one."""
        connection = self._ready()
        return None if connection is None else connection.join(domain, shape, keys, args)

    async def _send(self, command: bytes) -> Reply:
        connection = self._ready() or await self._connect()
        return await connection.send(command)

    async def connect(self) -> None:
        """Open the connection now if there is none (``ask_next`` needs one)."""
        if self._ready() is None:
            await self._connect()

    def ask_next(self) -> None:
        """Send ``ASKING`` now, so that the next command written on this connection may
        use a slot being migrated to this node (a Cluster's ``ASK`` redirection). The
        caller sends its command right after, before yielding to the loop; a batch
        still open this turn takes no more calls, so no call joins it past ASKING."""
        connection = self._ready()
        if connection is None:
            raise Disconnected("no connection to send ASKING on")
        connection.ask_next()

    def _ready(self) -> _Connection | None:
        """The open connection, if there is one that is not broken."""
        connection = self._connection
        return None if connection is None or connection.broken is not None else connection

    async def close(self) -> None:
        """Bounded by the timeout: an opening connection is waited for, then closed."""
        self._closed = True
        if self._opening is not None:
            await asyncio.wait([self._opening])
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
            await asyncio.wait([connection.lost], timeout=self.timeout)

    async def _connect(self) -> _Connection:
        if self._closed:
            raise Disconnected("the client was closed")
        # Callers that find no connection share one attempt: a Redis that does not
        # answer costs each of them one timeout, not one per caller queued before it.
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, task: asyncio.Task[_Connection]) -> None:
        self._opening = None
        if task.cancelled() or task.exception() is not None:
            return
        self._connection = task.result()
        if self._closed:
            self._connection.close()

    async def _open(self) -> _Connection:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._handshake(await self._dial())
        except (OSError, TimeoutError) as exc:
            where = self.address.path or f"{self.address.host}:{self.address.port}"
            raise Disconnected(f"cannot connect to Redis at {where}: {exc!r}") from exc

    async def _dial(self) -> _Connection:
        address, loop = self.address, asyncio.get_running_loop()
        if address.path:
            _, connection = await loop.create_unix_connection(
                lambda: _Connection(self.timeout), address.path
            )
        else:
            tls = ssl.create_default_context() if address.tls else None
            _, connection = await loop.create_connection(
                lambda: _Connection(self.timeout), address.host, address.port, ssl=tls
            )
        return connection

    async def _handshake(self, connection: _Connection) -> _Connection:
        loads = [("SCRIPT", "LOAD", script.body) for script in self.scripts]
        try:
            await asyncio.gather(*(connection.send(encode(c)) for c in self.address.handshake()))
            for outcome in await asyncio.gather(
                *(connection.send(encode(c)) for c in loads), return_exceptions=True
            ):
                # Refused (an ACL without SCRIPT, say): calls still work, by EVAL.
                if isinstance(outcome, BaseException) and not isinstance(outcome, RespError):
                    raise outcome
        except BaseException:
            connection.abort("the connection's handshake failed")
            raise
        return connection
