"""Circuit state shared through Redis, so that every proxy process agrees.

Off the hot path: a process publishes only when one of its circuits opens, grows or
closes (PUBLISH, plus a hash that a process starting later reads once), and applies
what the others publish from a subscription. The one Redis call a call may make is
when an endpoint is half-open: ``SET NX`` elects the single probe of the deployment.
Redis being down never blocks a call: each process then decides alone. The
subscription has a connection of its own (redis_subscription.py), so that cancelling
it at shutdown ends at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.observe.metrics import endpoint_label
from proxy.redis.protocol import ProtocolError, RespError
from proxy.redis.subscription import Subscription
from proxy.routing.circuit import Change, CircuitBreakers

log = logging.getLogger(__name__)

CHANNEL = "llmproxy:circuit"
STATES = "llmproxy:circuit:open"  # key → the latest opening, for processes that start later
_RETRY = 1.0


class CircuitSync:
    def __init__(
        self, url: str, redis: aioredis.Redis, breakers: CircuitBreakers, timeout: float
    ) -> None:
        self.url = url  # for the subscription; ``redis`` for the commands
        self.redis = redis
        self.breakers = breakers
        self.timeout = timeout  # for the commands
        self.origin = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._tasks: set[asyncio.Task[None]] = set()
        breakers.on_change = self.publish
        breakers.claim_probe = self.claim_probe
        breakers.end_probe = self.end_probe

    def publish(self, change: Change) -> None:
        self._spawn(self._publish(change))

    def end_probe(self, key: str) -> None:
        """The probe has its answer (and published it): the next cool-down may elect another."""
        self._spawn(self._delete(f"{CHANNEL}:probe:{key}"))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete(self, key: str) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.redis.delete(key)
        except (RedisError, OSError, TimeoutError):
            pass  # it expires after its lease

    async def _publish(self, change: Change) -> None:
        message = json.dumps(
            {
                "origin": self.origin,
                "key": change.key,
                "opened": change.opened,
                "until": change.open_until,
            }
        )
        try:
            async with asyncio.timeout(self.timeout), self.redis.pipeline(False) as pipe:
                if change.opened:
                    pipe.hset(STATES, change.key, message)
                else:
                    pipe.hdel(STATES, change.key)
                pipe.publish(CHANNEL, message)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("could not share circuit change of %s: %s", endpoint_label(change.key), exc)

    async def claim_probe(self, key: str, lease: float) -> bool:
        """Whether this process may send the deployment's one probe to ``key``."""
        try:
            async with asyncio.timeout(self.timeout):
                claimed = await self.redis.set(
                    f"{CHANNEL}:probe:{key}", self.origin, nx=True, px=max(1, int(lease * 1000))
                )
        except (RedisError, OSError, TimeoutError):
            return True  # Redis is down: decide alone rather than never probe
        return bool(claimed)

    async def follow(self) -> None:
        """Apply the others' changes, reconnecting after errors, until cancelled."""
        while True:
            try:
                await self._listen()
            except (RedisError, OSError, TimeoutError, RespError, ProtocolError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # A cancellation that a client library turned into an error of its
                    # own: the follower must still end, or shutdown waits on it.
                    raise asyncio.CancelledError from exc
                log.warning("circuit sharing paused, Redis failed: %r", exc)
            await asyncio.sleep(_RETRY)

    async def _load(self) -> None:
        async with asyncio.timeout(self.timeout):
            states = await self.redis.hgetall(STATES)
        for raw in states.values():
            self._apply(raw)

    async def _listen(self) -> None:
        subscription = await Subscription.open(self.url, CHANNEL, self.timeout)
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
        await self.redis.aclose()
