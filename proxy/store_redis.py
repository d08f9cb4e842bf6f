"""The limiter and ledger in Redis, shared by every proxy replica.

Every call is one script round trip (EVALSHA; EVAL once after a Redis restart). The
hot path (admit, settle, renew) runs on the lean pipelined client of resp_client.py;
ledger reads, rare and off the hot path, on redis-py. Any Redis or socket error
becomes ``StoreUnavailable``: the caller falls back or refuses, and queues
settlements. Neither client retries, so a down Redis costs one short timeout, not
several.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.resp import Arg, Reply, RespError, encode_items
from proxy.resp_client import RespClient, Script
from proxy.store import (
    KIND_CODES,
    LEDGER_FIELDS,
    Admission,
    Check,
    LedgerRow,
    Settlement,
    StoreUnavailable,
    limit_state,
)
from proxy.store_lua import ADMIT, RENEW, SETTLE

PREFIX = "llmproxy"


def team_key(team: str, *parts: str) -> str:
    """All keys of a team share the hash tag {team}: one Cluster slot per team."""
    return ":".join((PREFIX, f"{{{team}}}", *parts))


_KEY_KINDS = {"requests_per_minute": "rpm", "tokens_per_minute": "tpm", "concurrent": "conc",
              "tokens_per_day": "tpd"}  # fmt: skip


def check_key(team: str, check: Check) -> str:
    return team_key(team, _KEY_KINDS[check.kind], check.scope)


def _check_args(checks: tuple[Check, ...]) -> list[Arg]:
    return [x for c in checks for x in (KIND_CODES[c.kind], c.limit)]


@dataclass(frozen=True)
class TeamParts:
    """What the script calls of one team's checks have in common, encoded once: every
    call then encodes only what is its own (request id, tokens, day). Encoding all of a
    call's keys and arguments anew was the largest Python cost of the Redis path."""

    checks: tuple[Check, ...]
    admit_keys: bytes  # numkeys and the checks' keys
    settle_keys: bytes  # the ledger index and the checks' keys, after the call's own keys
    check_args: bytes  # each check's kind code and limit

    @classmethod
    def of(cls, team: str, checks: tuple[Check, ...]) -> TeamParts:
        keys = [check_key(team, c) for c in checks]
        return cls(
            checks, encode_items((len(keys), *keys)),
            encode_items((team_key(team, "ledger-index"), *keys)),
            encode_items(_check_args(checks)),
        )  # fmt: skip


def admit_items(parts: TeamParts, lease: str, lease_ttl: float, reserved: int) -> tuple[int, bytes]:
    """ADMIT's numkeys, keys and arguments: KEYS = the checks' keys, ARGV = lease,
    lease ttl, reserved tokens, then kind code and limit per check."""
    n = len(parts.checks)
    items = encode_items((lease, lease_ttl, reserved))
    return 1 + n + 3 + 2 * n, parts.admit_keys + items + parts.check_args


def settle_items(parts: TeamParts, s: Settlement) -> tuple[int, bytes]:
    """SETTLE's: KEYS = done marker, ledger hash, ledger index, the checks' keys; ARGV =
    day, model, request id, reserved, used, prompt and completion tokens, estimated,
    then kind code and limit per check."""
    n = len(parts.checks)
    own_keys = encode_items((3 + n, team_key(s.team, "done", s.request_id),
                             team_key(s.team, "ledger", str(s.day), s.model)))  # fmt: skip
    args = encode_items((s.day, s.model, s.request_id, s.reserved, s.used, s.prompt_tokens,
                         s.completion_tokens, 1 if s.estimated else 0))  # fmt: skip
    return 1 + 3 + n + 8 + 2 * n, own_keys + parts.settle_keys + args + parts.check_args


class RedisStore:
    def __init__(self, url: str, timeout: float):
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=False,
        )  # fmt: skip
        self._admit, self._settle, self._renew = (Script.of(s) for s in (ADMIT, SETTLE, RENEW))
        self.hot = RespClient(url, timeout, scripts=(self._admit, self._settle, self._renew))
        # (team, id(checks)) → parts; checks tuples are made once per config and team.
        self._parts: dict[tuple[str, int], TeamParts] = {}

    async def close(self) -> None:
        try:
            await self.hot.close()
        finally:
            await self.redis.aclose()

    async def _run(self, call: Awaitable[Reply]) -> Any:
        try:
            return await call
        except (RespError, OSError) as exc:  # Disconnected and TimeoutError are OSErrors
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _team_parts(self, team: str, checks: tuple[Check, ...]) -> TeamParts:
        parts = self._parts.get((team, id(checks)))
        # The entry keeps its tuple alive, so no other tuple can have its id meanwhile;
        # the identity check only guards that reasoning.
        if parts is None or parts.checks is not checks:
            if len(self._parts) > 4096:  # reloads leave old tuples behind: bound it
                self._parts.clear()
            parts = self._parts[(team, id(checks))] = TeamParts.of(team, checks)
        return parts

    async def admit(
        self, team: str, checks: tuple[Check, ...], reserved: int, lease: str, lease_ttl: float
    ) -> Admission:
        parts = self._team_parts(team, checks)
        items = admit_items(parts, lease, lease_ttl, reserved)
        reply = await self._run(self.hot.run_encoded(self._admit, *items))
        admitted, day, refused = int(reply[0]), int(reply[1]), int(reply[2])
        retry, now = float(reply[3]), float(reply[4])
        levels = [float(v) for v in reply[5:]]
        taking = reserved if admitted else 0
        states = tuple(limit_state(c, v, taking, now) for c, v in zip(checks, levels, strict=True))
        if admitted:
            return Admission(True, day, states)
        return Admission(False, day, states, refused=checks[refused - 1], retry_after=retry)

    async def settle(self, s: Settlement) -> None:
        items = settle_items(self._team_parts(s.team, s.checks), s)
        await self._run(self.hot.run_encoded(self._settle, *items))

    async def renew(self, team: str, checks: tuple[Check, ...], lease: str, ttl: float) -> None:
        keys = [check_key(team, c) for c in checks if c.kind == "concurrent"]
        if keys:
            await self._run(self.hot.run_script(self._renew, keys, [lease, math.ceil(ttl)]))

    async def ledger(self, teams: list[str], first_day: int, last_day: int) -> list[LedgerRow]:
        try:
            return [
                row for team in teams for row in await self._team_ledger(team, first_day, last_day)
            ]
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _team_ledger(self, team: str, first_day: int, last_day: int) -> list[LedgerRow]:
        entries: list[tuple[int, str]] = []
        for member in await self.redis.smembers(team_key(team, "ledger-index")):
            text = member.decode() if isinstance(member, bytes) else member
            day_text, _, model = text.partition(":")
            if first_day <= int(day_text) <= last_day:
                entries.append((int(day_text), model))
        rows = []
        for day, model in sorted(entries):
            counts = await self.redis.hgetall(team_key(team, "ledger", str(day), model))
            values = tuple(int(counts.get(f.encode(), 0)) for f in LEDGER_FIELDS)
            rows.append(LedgerRow(team, model, day, values))
        return rows
