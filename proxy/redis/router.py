"""Which Redis node takes a command: the one node, a Redis Cluster's slot owner, or the
primary that Sentinel names. Every user of Redis goes through here, so this routing
is written once (docs/ARCHITECTURE.md, "Redis").

``redis.url`` names a node, or several (seeds: a start needs one of them up). The
first that answers tells which kind of deployment it is: ``CLUSTER SLOTS`` gives a
Cluster's slot map, and a node without cluster support refuses it, so it is a single
node. ``redis+sentinel://host:port[,host:port…]/SERVICE`` asks the sentinels for the
primary of SERVICE instead.

Each node is a ``RespClient`` (redis/client.py): one pipelined connection, whose
batches of script calls per loop turn stay per node. A command goes to the owner of
its key's slot (a team's keys share the hash tag ``{team}``, so a team lives on one
node). The topology changes under a running proxy, and this follows it:

- ``MOVED``: the slot's new owner is noted, the map read again, the command resent.
- ``ASK`` (a slot being migrated): resent to the node named, after ``ASKING``.
- ``TRYAGAIN``, ``CLUSTERDOWN``: resent after a short backoff, a few times; then the
  error is the caller's (for the limiter: its ``on_error``).
- a node that does not answer (a primary killed) or is read-only (demoted): its
  callers fail at once, and the map, or the sentinels' answer, is read again, at most
  every ``REFRESH_EVERY`` seconds, until a replica has taken over.

Only commands that Redis refused with ``MOVED``, ``ASK``, ``TRYAGAIN`` or
``CLUSTERDOWN`` are resent: it ran none of them, so a resend cannot count anything
twice. A command whose connection broke is not resent, as in the single-node client.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from proxy.redis.batch import BatchShape
from proxy.redis.client import Address, Disconnected, RespClient
from proxy.redis.protocol import Arg, Reply, RespError, Script
from proxy.redis.seeds import Seeds

log = logging.getLogger(__name__)

SLOTS = 16384
REFRESH_EVERY = 0.5  # seconds between two readings of the topology after a failure
_REDIRECTS = 5  # MOVED or ASK in a row before the command fails
_RETRIES = 4  # TRYAGAIN or CLUSTERDOWN in a row, resent after 25, 50, 100, 200 ms
# Commands whose first argument is not a key: any node takes them (a Cluster's PUBLISH
# reaches every node's subscribers).
_UNKEYED = frozenset({"PUBLISH", "PING", "CLUSTER", "SENTINEL", "ROLE", "INFO", "WAIT"})

T = TypeVar("T")


def key_slot(key: str) -> int:
    """Redis Cluster's slot of a key: CRC16 of its hash tag (the part between the first
    ``{`` and the next ``}``, when not empty), else of the whole key."""
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % SLOTS


@dataclass(frozen=True)
class Topology:
    kind: Literal["node", "cluster", "sentinel"]
    slots: tuple[RespClient, ...]  # one entry, or SLOTS of them for a Cluster

    def owner(self, key: str | None) -> RespClient:
        slots = self.slots
        return slots[0] if key is None or len(slots) == 1 else slots[key_slot(key)]


class Router:
    """``RespClient``'s calls, each sent to the node that serves its key."""

    def __init__(self, urls: Sequence[str], timeout: float, scripts: Sequence[Script] = ()):
        self.seeds = Seeds.parse(urls)
        self.timeout = timeout
        self.scripts = tuple(scripts)
        self.topology: Topology | None = None
        self._nodes: dict[tuple[str, int], RespClient] = {}
        # Second connections to the same nodes, for calls that must not share the
        # first's pipeline (the ledger's WAITs): same topology, other sockets.
        self._lanes: dict[tuple[str, RespClient], RespClient] = {}
        self._reading: asyncio.Task[Topology] | None = None
        self._last_read = -REFRESH_EVERY
        self._closed = False

    # The calls, as RespClient has them.

    async def execute(self, *args: Arg) -> Reply:
        keyed = len(args) > 1 and str(args[0]).upper() not in _UNKEYED
        return await self._routed(str(args[1]) if keyed else None, lambda c: c.execute(*args))

    async def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Reply:
        key = keys[0] if keys else None
        return await self._routed(key, lambda c: c.run_script(script, keys, args))

    def run_batched(
        self, route: str, shape: BatchShape, keys: bytes, args: bytes, lane: str = ""
    ) -> Awaitable[Reply]:
        """A script call batched per loop turn with the others of ``route``, a key of
        the batch (its hash tag names the slot, and the batch's order is per route).
        ``lane``: on the node's connection of that name rather than its first. Not a
        coroutine itself: on a single node the node's own call is handed back, one
        coroutine less per call (the hot path's admission and settlement)."""
        topology = self.topology
        if topology is not None and topology.kind == "node" and not lane:  # no routing
            return topology.slots[0].run_batched(route, shape, keys, args)
        return self._routed(route, lambda c: c.run_batched(route, shape, keys, args), lane)

    async def run_batched_replicated(
        self,
        route: str,
        shape: BatchShape,
        keys: bytes,
        args: bytes,
        replicas: int,
        ms: int,
        lane: str = "",
    ) -> tuple[Reply, int]:
        """``run_batched`` confirmed by ``WAIT`` (redis/client.py): its reply, and how
        many replicas have the write."""
        return await self._routed(
            route,
            lambda c: c.run_batched_replicated(route, shape, keys, args, replicas, ms),
            lane,
        )

    def join_now(
        self, route: str, shape: BatchShape, keys: bytes, args: bytes
    ) -> asyncio.Future[Reply] | None:
        """``run_batched`` for a caller that does not wait: the reply's future, or None
        (nothing sent) when the node's connection is not open yet."""
        topology = self.topology
        if topology is None:
            return None
        sent = topology.owner(route).join_now(route, shape, keys, args)
        if sent is None or topology.kind == "node":
            return sent
        # A redirection is followed off the caller's path, by a task.
        outcome: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def settled(first: asyncio.Future[Reply]) -> None:
            error = None if first.cancelled() else first.exception()
            if isinstance(error, RespError) and _resendable(error):
                again = asyncio.ensure_future(self.run_batched(route, shape, keys, args))
                again.add_done_callback(lambda f: _copy(f, outcome))
            else:
                _copy(first, outcome)

        sent.add_done_callback(settled)
        return outcome

    async def replicas(self, key: str) -> int:
        """How many replicas of the node that owns ``key`` are online and caught up
        (``INFO replication``: ``state=online``, ``lag`` of a second at most). It does
        not block, where a WAIT for replicas that are missing or still syncing holds
        its connection up until it times out."""
        reply = await self._routed(key, lambda c: c.execute("INFO", "replication"))
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else ""
        return sum(
            1
            for line in text.splitlines()
            if line.startswith("slave") and "state=online" in line and _lag(line) <= 1
        )

    async def subscribe_address(self) -> Address:
        """A node to subscribe on: in a Cluster any node hears every PUBLISH."""
        topology = self.topology or await self._read()
        return topology.slots[0].address

    def suspect(self) -> None:
        """A caller saw a node fail outside these calls (a subscription): read the
        topology again soon."""
        self._read_soon()

    async def close(self) -> None:
        self._closed = True
        if self._reading is not None:
            with contextlib.suppress(Exception):
                await self._reading
        nodes = [*self._nodes.values(), *self._lanes.values()]
        await asyncio.gather(*(node.close() for node in nodes))

    # Routing.

    async def _routed(
        self, key: str | None, send: Callable[[RespClient], Awaitable[T]], lane: str = ""
    ) -> T:
        redirects = retries = 0
        asked: RespClient | None = None
        while True:
            topology = self.topology or await self._read()
            node = self._lane(asked or topology.owner(key), lane)
            try:
                if asked is None:
                    return await send(node)
                await node.connect()
                node.ask_next()
                return await send(node)  # ASKING and the command leave together
            except RespError as error:
                asked = None
                kind = _resendable(error)
                if kind is None or topology.kind != "cluster":
                    if error.message.startswith("READONLY"):  # a primary demoted
                        self._read_soon()
                    raise
                if kind in ("MOVED", "ASK"):
                    redirects += 1
                    if redirects > _REDIRECTS:
                        raise
                    target = self._redirected(error, topology, moved=kind == "MOVED")
                    asked = target if kind == "ASK" else None
                else:  # TRYAGAIN, CLUSTERDOWN: the slot is busy or the cluster unsure
                    retries += 1
                    if retries > _RETRIES:
                        raise
                    await asyncio.sleep(0.025 * 2 ** (retries - 1))
            except (Disconnected, OSError, TimeoutError):
                if topology.kind != "node":
                    self._read_soon()
                raise

    def _redirected(self, error: RespError, topology: Topology, moved: bool) -> RespClient:
        """The node a MOVED or ASK names (``MOVED 3999 127.0.0.1:6381``); a MOVED also
        changes the slot's owner now, and the whole map is read again."""
        _, slot_text, where = error.message.split()
        host, _, port = where.rpartition(":")
        node = self._node(host or topology.owner(None).address.host, int(port))
        if moved and len(topology.slots) == SLOTS:
            slots = list(topology.slots)
            slots[int(slot_text)] = node
            self.topology = replace(topology, slots=tuple(slots))
            self._read_soon()
        return node

    def _lane(self, node: RespClient, lane: str) -> RespClient:
        if not lane:
            return node
        other = self._lanes.get((lane, node))
        if other is None:
            other = self._lanes[(lane, node)] = RespClient(node.address, self.timeout, self.scripts)
        return other

    def _node(self, host: str, port: int) -> RespClient:
        node = self._nodes.get((host, port))
        if node is None:
            assert self.seeds.node is not None
            address = replace(self.seeds.node, host=host, port=port, path="")
            node = self._nodes[(host, port)] = RespClient(address, self.timeout, self.scripts)
        return node

    # Reading the topology: once at the first call, again after a failure.

    async def _read(self) -> Topology:
        if self._closed:
            raise Disconnected("the client was closed")
        if self._reading is None:
            self._last_read = time.monotonic()
            self._reading = asyncio.ensure_future(self._discover())
            self._reading.add_done_callback(self._have_read)
        return await asyncio.shield(self._reading)

    def _read_soon(self) -> None:
        if self._reading is None and time.monotonic() - self._last_read >= REFRESH_EVERY:
            asyncio.ensure_future(self._read()).add_done_callback(_quiet)

    def _have_read(self, task: asyncio.Task[Topology]) -> None:
        self._reading = None
        if not task.cancelled() and task.exception() is None:
            before, self.topology = self.topology, task.result()
            if before is not None and before.slots != self.topology.slots:
                log.info("Redis topology changed: %s", _describe(self.topology))

    async def _discover(self) -> Topology:
        if self.seeds.service:
            return await self._ask_sentinels()
        known = [] if self.topology is None else list(dict.fromkeys(self.topology.slots))
        seeds = [self._seed(a) for a in self.seeds.addresses]
        failures = []
        for node in dict.fromkeys([*known, *seeds]):
            try:
                reply = await node.execute("CLUSTER", "SLOTS")
            except RespError:  # no cluster support (or not allowed): one node
                return Topology("node", (node,))
            except (Disconnected, OSError, TimeoutError) as exc:
                failures.append(str(exc))
                continue
            return Topology("cluster", self._slot_map(reply, node))
        raise Disconnected("; ".join(failures) or "no Redis node to ask")

    def _seed(self, address: Address) -> RespClient:
        if address.path:  # a unix socket: one node, by its path
            key = (address.path, 0)
            if key not in self._nodes:
                self._nodes[key] = RespClient(address, self.timeout, self.scripts)
            return self._nodes[key]
        return self._node(address.host, address.port)

    def _slot_map(self, reply: Reply, answered: RespClient) -> tuple[RespClient, ...]:
        """CLUSTER SLOTS: [[first, last, [host, port, id], replicas…], …]. A slot no
        range covers (a cluster being set up) goes to the node that answered, which
        answers for it with MOVED or CLUSTERDOWN."""
        slots = [answered] * SLOTS
        for entry in reply if isinstance(reply, list) else []:
            match entry:
                case [int(first), int(last), [bytes(host), int(port), *_], *_]:
                    node = self._node(host.decode() or answered.address.host, port)
                    slots[first : last + 1] = [node] * (last - first + 1)
                case _:
                    raise RespError(f"CLUSTER SLOTS gave an entry not understood: {entry!r:.200}")
        return tuple(slots)

    async def _ask_sentinels(self) -> Topology:
        """The primary most of the sentinels that answer name: right after a failover
        one that has not heard of it yet may still name the old primary."""
        answers = await asyncio.gather(*(self._ask(s) for s in self.seeds.addresses))
        named = Counter(a for a in answers if isinstance(a, tuple))
        if not named:
            raise Disconnected("; ".join(a for a in answers if isinstance(a, str)))
        (host, port), _ = named.most_common(1)[0]
        return Topology("sentinel", (self._node(host, port),))

    async def _ask(self, sentinel: Address) -> tuple[str, int] | str:
        """What one sentinel names as the primary, or why it did not say."""
        asking = RespClient(sentinel, self.timeout)
        where = f"sentinel {sentinel.host}:{sentinel.port}"
        try:
            reply = await asking.execute("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.seeds.service)
        except (RespError, Disconnected, OSError, TimeoutError) as exc:
            return f"{where}: {exc}"
        finally:
            await asking.close()
        match reply:
            case [bytes(host), bytes(port)]:
                return host.decode(), int(port)
        return f"{where} knows no primary {self.seeds.service!r}"


def _lag(line: str) -> int:
    """A replica's ``lag=N`` (seconds since its last acknowledgement) in INFO's line."""
    for field in line.split(","):
        if field.startswith("lag="):
            return int(field[4:]) if field[4:].isdigit() else 1 << 30
    return 1 << 30


def _resendable(error: RespError) -> str | None:
    kind = error.message.split(" ", 1)[0]
    return kind if kind in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN") else None


def _copy(source: asyncio.Future[Reply], target: asyncio.Future[Reply]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


def _quiet(task: asyncio.Future[Topology]) -> None:
    """A reading started by a failure: its own failure is the next caller's to see."""
    if not task.cancelled():
        task.exception()


def _describe(topology: Topology) -> str:
    owners: dict[str, int] = {}
    for node in topology.slots:
        where = f"{node.address.host}:{node.address.port}"
        owners[where] = owners.get(where, 0) + 1
    return ", ".join(f"{where} ({count} slots)" for where, count in sorted(owners.items()))
