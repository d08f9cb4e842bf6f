"""Circuit state shared through Redis, so that every proxy process agrees.

Off the hot path: a process publishes only when one of its circuits opens, grows or
closes (PUBLISH, plus a hash that a process starting later reads once), and applies
what the others publish from a subscription. The one Redis call a call may make is
when an endpoint is half-open: a ``SET NX`` in a script elects the single probe of the
deployment.
Redis being down never blocks a call: each process then decides alone. Commands go
through the proxy's Redis client (proxy/redis/client.py), on a connection of their own,
each bounded by the Redis timeout; the subscription has a socket of its own
(proxy/redis/subscription.py), so that cancelling it at shutdown ends at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from proxy.observe.metrics import endpoint_label
from proxy.redis.protocol import Arg, ProtocolError, RespError, Script
from proxy.redis.router import Router
from proxy.redis.subscription import Subscription
from proxy.routing.circuit import Change, CircuitBreakers

log = logging.getLogger(__name__)

CHANNEL = "llmproxy:circuit"
# The hash of the latest openings (for processes that start later, and for the claim
# below) and the probes' claims share a hash tag: one slot, on a Cluster too.
_TAG = "{llmproxy:circuit}"
STATES = f"{_TAG}:open"  # key → the latest opening


def claim_key(key: str) -> str:
    return f"{_TAG}:probe:{key}"


# The probe's election, and a check that nobody opened the circuit again meanwhile: a
# failed probe's opening is written (HSET) before its claim is deleted, so a process
# that finds the claim free but has not heard the opening yet (a Cluster's PUBLISH
# travels over the bus, the DEL does not) would otherwise probe a second time.
# KEYS: the openings, the claim; ARGV: the endpoint, this process, the lease (ms), now.
_CLAIM = Script.of("""
local open = redis.call('HGET', KEYS[1], ARGV[1])
if open then
  local ok, change = pcall(cjson.decode, open)
  if ok and tonumber(change['opened']) ~= 0 and tonumber(change['until']) > tonumber(ARGV[4]) then
    return false
  end
end
return redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3])
""")
_RETRY = 1.0
# What a Redis that is down, slow or refusing raises (Disconnected and TimeoutError are
# OSErrors); anything else is a bug and is raised.
_FAILURES = (RespError, ProtocolError, OSError)


class CircuitSync:
    def __init__(self, urls: str | Sequence[str], breakers: CircuitBreakers, timeout: float):
        # The claim's script is not loaded on connecting: it runs rarely (a cool-down's
        # end), and its first run pays a NOSCRIPT and an EVAL instead.
        self.redis = Router([urls] if isinstance(urls, str) else urls, timeout)
        self.breakers = breakers
        self.timeout = timeout
        self.origin = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._tasks: set[asyncio.Task[None]] = set()
        breakers.on_change = self.publish
        breakers.claim_probe = self.claim_probe
        breakers.end_probe = self.end_probe

    def publish(self, change: Change) -> None:
        self._spawn(self._publish(change))

    def end_probe(self, key: str) -> None:
        """The probe has its answer: the next cool-down may elect another, once the
        answer's change (published just before) is out, so that no process that has not
        heard of it yet finds the claim free and probes again."""
        self._spawn(self._delete(claim_key(key), after=set(self._tasks)))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete(self, key: str, after: set[asyncio.Task[None]]) -> None:
        if after:
            await asyncio.wait(after)
        with contextlib.suppress(*_FAILURES):  # else it expires after its lease
            await self.redis.execute("DEL", key)

    async def _publish(self, change: Change) -> None:
        message = json.dumps(
            {
                "origin": self.origin,
                "key": change.key,
                "opened": change.opened,
                "until": change.open_until,
            }
        )
        stored: tuple[Arg, ...] = (
            ("HSET", STATES, change.key, message) if change.opened else ("HDEL", STATES, change.key)
        )
        # Both in one write (the client sends a loop turn's commands together).
        sent = [self.redis.execute(*stored), self.redis.execute("PUBLISH", CHANNEL, message)]
        for outcome in await asyncio.gather(*sent, return_exceptions=True):
            if isinstance(outcome, _FAILURES):
                label = endpoint_label(change.key)
                log.warning("could not share circuit change of %s: %s", label, outcome)
                return
            if isinstance(outcome, BaseException):
                raise outcome

    async def claim_probe(self, key: str, lease: float) -> bool:
        """Whether this process may send the deployment's one probe to ``key``."""
        lease_ms = max(1, int(lease * 1000))
        try:
            claimed = await self.redis.run_script(
                _CLAIM, [STATES, claim_key(key)], [key, self.origin, lease_ms, repr(time.time())]
            )
        except _FAILURES:
            return True  # Redis is down: decide alone rather than never probe
        return claimed is not None  # OK, or nil when another process holds the claim

    async def follow(self) -> None:
        """Apply the others' changes, reconnecting after errors, until cancelled."""
        while True:
            try:
                await self._listen()
            except _FAILURES as exc:  # a cancellation stays one: the client converts none
                log.warning("circuit sharing paused, Redis failed: %r", exc)
                self.redis.suspect()  # a Cluster's node or Sentinel's primary may be gone
            await asyncio.sleep(_RETRY)

    async def _load(self) -> None:
        states = await self.redis.execute("HGETALL", STATES)  # field, value, field, …
        if isinstance(states, list):
            for raw in states[1::2]:
                if isinstance(raw, bytes):
                    self._apply(raw)

    async def _listen(self) -> None:
        address = await self.redis.subscribe_address()
        subscription = await Subscription.open(address, CHANNEL, self.timeout)
        try:
            await self._load()  # after subscribing: no change falls between the two
            while True:
                self._apply(await subscription.message())
        finally:
            subscription.close()

    def _apply(self, raw: bytes | str) -> None:
        try:
            data = json.loads(raw)
            change = Change(str(data["key"]), int(data["opened"]), float(data["until"]))
        except (ValueError, KeyError, TypeError):
            return
        if data.get("origin") == self.origin:
            return
        if change.opened and change.open_until < time.time():
            return  # an old opening left in the hash: the cool-down is over
        self.breakers.merge(change)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.timeout)
        await self.redis.close()
