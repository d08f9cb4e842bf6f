"""Limits and the ledger behind Redis Sentinel: a proxy whose redis.url names the
sentinels follows the primary they name, through a failover, and with
``ledger_replicas: 1`` loses no settlement."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp

from proxy.call.auth import key_hash
from tests.support import ProxyProcess, Upstream, eventually, free_port, routes_yaml
from tests.support.redis_sentinel import RedisSentinels
from tests.support.redis_server import Tls
from tests.support.teams import ADMIN_KEY, need_redis

KEY = "sk-proxy-research-0123456789"
BODY = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


def _yaml(url: str, limits: str) -> str:
    return f"""
admin_key: {ADMIN_KEY}
redis: {{url: "{url}", timeout: 500ms, ledger_replicas: 1}}
teams:
  research: {{keys: ["{key_hash(KEY)}"], limits: {limits}}}
"""


async def _calls(url: str, seen: list[tuple[int, str]], stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            async with http.post(url + "/v1/chat/completions", json=BODY, headers=headers) as r:
                seen.append((r.status, await r.text()))


async def _booked(url: str) -> dict[str, int]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + "/v1/usage", params={"from": "2026-01-01"}, headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
        rows = (await resp.json())["data"]
    fields = ("requests", "prompt_tokens", "completion_tokens")
    return {f: sum(row[f] for row in rows) for f in fields}


async def test_the_proxy_follows_a_failover_and_loses_no_settlement(
    tmp_path: Path, wandb: Upstream, prime: Upstream, redis_sentinels: RedisSentinels
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime) + _yaml(redis_sentinels.url, "{concurrent: 100}"))
    proxy = ProxyProcess(path, free_port())
    try:
        await proxy.wait_listening()
        seen: list[tuple[int, str]] = []
        stop = asyncio.Event()
        calls = [asyncio.ensure_future(_calls(proxy.url, seen, stop)) for _ in range(4)]
        await asyncio.sleep(0.5)
        old = redis_sentinels.primary
        assert redis_sentinels.primary_port() == old.port
        assert old.process is not None
        old.process.send_signal(signal.SIGKILL)
        old.process.wait()
        old.process = None
        killed_at = time.monotonic()
        new = redis_sentinels.replica  # the one replica: the one sentinel promotes
        await asyncio.to_thread(
            redis_sentinels.wait_for, lambda: redis_sentinels.primary_port() == new.port, 60
        )
        promoted_after = time.monotonic() - killed_at
        await redis_sentinels.rejoin(old, new)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*calls)
        # fail_open: no 5xx. Not yet true: no 429 either. While the killed primary comes
        # back as a replica, settlements waiting for it can hold concurrency slots for a
        # moment, and calls at the limit get 429 (docs/TESTING.md, "Not yet tested").
        assert {status for status, _ in seen} <= {200, 429}
        seen = [(status, body) for status, body in seen if status == 200]
        usage = [json.loads(body)["usage"] for _, body in seen]
        want = {
            "requests": len(seen),
            "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
            "completion_tokens": sum(u["completion_tokens"] for u in usage),
        }
        deadline = time.monotonic() + 10
        while await _booked(proxy.url) != want and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await _booked(proxy.url) == want, f"promoted {promoted_after:.1f} s after"
        assert "Redis topology changed" in proxy.log()
    finally:
        proxy.stop()


async def test_sentinels_and_nodes_behind_tls_and_a_password(
    tmp_path: Path, wandb: Upstream, prime: Upstream
) -> None:
    """``rediss+sentinel://:password@…``: the sentinels and the nodes they name speak
    only TLS, the nodes require a password. The proxy reaches the primary through
    them, holds the team to its limit there and has each settlement confirmed by the
    replica (``ledger_replicas: 1``)."""
    need_redis()
    tls = Tls.make(tmp_path)
    sentinels = RedisSentinels(tmp_path, password="s3cret-pw", tls=tls)
    path = tmp_path / "routes.yaml"
    limits = "{requests_per_minute: 20, tokens_per_minute: 1000000}"
    path.write_text(routes_yaml(wandb, prime) + _yaml(sentinels.url, limits))
    proxy = ProxyProcess(path, free_port(), env={"SSL_CERT_FILE": str(tls.ca)})
    try:
        assert sentinels.url.startswith("rediss+sentinel://:s3cret-pw@")
        await proxy.wait_listening()
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as http:

            async def call() -> int:
                url = proxy.url + "/v1/chat/completions"
                async with http.post(url, json=BODY, headers=headers) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(call() for _ in range(40)))
        assert sorted(statuses) == [200] * 20 + [429] * 20
        await asyncio.sleep(0.3)  # settlements leave after the answers
        # A replica that acknowledges after a settlement's WAIT (at most 50 ms; seen once
        # over TLS under the full suite's load) leaves it unconfirmed, and the proxy
        # sends it again until it is confirmed: the flush says so. Nothing else fails.
        unconfirmed = ("replicas confirmed a ledger write", "replicas are connected")
        failed = [line for line in proxy.log().splitlines() if "redis failed" in line.lower()]
        assert [line for line in failed if not line.endswith(unconfirmed)] == []
        if failed:
            await eventually(lambda: "ledger queue flushed" in proxy.log(), timeout=10)
        assert (await _booked(proxy.url))["requests"] == 20
    finally:
        proxy.stop()
        sentinels.stop()
