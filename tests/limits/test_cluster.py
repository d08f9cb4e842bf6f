"""Limits and the ledger on a real Redis Cluster (3 primaries, 3 replicas), through
proxy processes whose routes.yaml names one node: exact across processes and shards,
through a primary killed under load, and through a slot moved under load."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.call.auth import key_hash
from proxy.redis.router import key_slot
from tests.support import ProxyProcess, Upstream, eventually, free_port, routes_yaml
from tests.support.metrics import scrape
from tests.support.redis_cluster import NODE_TIMEOUT_MS, RedisCluster
from tests.support.redis_server import Tls
from tests.support.teams import ADMIN_KEY, need_redis

# Three teams whose slots lie on the three shards of a fresh cluster (redis-cli gives
# the first primary slots 0-5460, the second 5461-10922, the third the rest).
TEAMS = ("alpha", "delta", "beta")
BODY = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


def test_the_teams_lie_on_three_shards() -> None:
    assert sorted(key_slot(team) * 3 // 16384 for team in TEAMS) == [0, 1, 2]


def _key(team: str) -> str:
    return f"sk-proxy-{team}-0123456789"


def _teams_yaml(url: str, limits: str, on_error: str = "fail_open", replicas: int = 0) -> str:
    teams = "\n".join(
        f'  {team}: {{keys: ["{key_hash(_key(team))}"], limits: {limits}}}' for team in TEAMS
    )
    return f"""
admin_key: {ADMIN_KEY}
redis: {{url: "{url}", on_error: {on_error}, timeout: 500ms, ledger_replicas: {replicas}}}
accounting: {{default_max_tokens: 50}}
teams:
{teams}
"""


async def _call(http: aiohttp.ClientSession, url: str, team: str) -> int:
    headers = {"Authorization": f"Bearer {_key(team)}"}
    async with http.post(url + "/v1/chat/completions", json=BODY, headers=headers) as resp:
        await resp.read()
        return resp.status


async def _burst(urls: list[str], team: str, count: int) -> list[int]:
    """``count`` calls of ``team`` at once, spread over the processes."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        return list(
            await asyncio.gather(*(_call(http, urls[i % len(urls)], team) for i in range(count)))
        )


async def _processes(
    tmp_path: Path, text: str, count: int, env: dict[str, str] | None = None
) -> list[ProxyProcess]:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    processes = [ProxyProcess(path, free_port(), env=env) for _ in range(count)]
    for process in processes:
        await process.wait_listening()
    return processes


@pytest.fixture
async def stopped_at_end() -> AsyncIterator[list[ProxyProcess]]:
    processes: list[ProxyProcess] = []
    yield processes
    for process in processes:
        process.stop()


async def _ledger(url: str, field: str = "requests") -> dict[str, int]:
    """What is booked per team, from GET /v1/usage (every shard's rows)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    since = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()  # midnight
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + "/v1/usage", params={"from": since}, headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
        rows = (await resp.json())["data"]
    booked: Counter[str] = Counter()
    for row in rows:
        booked[row["team"]] += row[field]
    return dict(booked)


async def test_three_processes_admit_exactly_each_team_s_limit_on_every_shard(
    tmp_path: Path,
    wandb: Upstream,
    prime: Upstream,
    redis_cluster: RedisCluster,
    stopped_at_end: list[ProxyProcess],
) -> None:
    await _admits_exactly(tmp_path, routes_yaml(wandb, prime), redis_cluster, stopped_at_end)


async def test_a_cluster_behind_tls_and_a_password(
    tmp_path: Path,
    wandb: Upstream,
    prime: Upstream,
    stopped_at_end: list[ProxyProcess],
) -> None:
    """``rediss://:password@node`` of a Cluster that speaks only TLS (clients, replicas
    and its bus) and requires a password: every node the proxy learns of from the slot
    map is reached with the seed's TLS and credentials, and the limits are as exact."""
    need_redis()
    tls = Tls.make(tmp_path)
    cluster = RedisCluster(tmp_path, password="s3cret-pw", tls=tls)
    try:
        assert cluster.url.startswith("rediss://:s3cret-pw@")
        env = {"SSL_CERT_FILE": str(tls.ca)}  # the proxy trusts the test's CA
        await _admits_exactly(tmp_path, routes_yaml(wandb, prime), cluster, stopped_at_end, env)
    finally:
        cluster.stop()


async def _admits_exactly(
    tmp_path: Path,
    routes: str,
    cluster: RedisCluster,
    stopped_at_end: list[ProxyProcess],
    env: dict[str, str] | None = None,
) -> None:
    """Three processes, 200 calls per team at once against requests_per_minute 50:
    exactly 50 admitted per team, booked once, each team's keys on its own shard."""
    text = routes + _teams_yaml(
        cluster.url, "{requests_per_minute: 50, tokens_per_minute: 1000000}"
    )
    stopped_at_end += await _processes(tmp_path, text, 3, env)
    urls = [p.url for p in stopped_at_end]
    results = await asyncio.gather(*(_burst(urls, team, 200) for team in TEAMS))
    for statuses in results:
        assert Counter(statuses) == {200: 50, 429: 150}
    await asyncio.sleep(0.3)  # settlements leave after the answers
    assert await _ledger(urls[0]) == dict.fromkeys(TEAMS, 50)
    assert not any("redis failed" in p.log() for p in stopped_at_end)  # no fallback
    for team in TEAMS:  # each team's keys on the shard that owns its slot, nowhere else
        owner = cluster.owner(f"{{{team}}}")
        for node in cluster.primaries():
            client = node.client()
            try:
                keys = client.keys(f"llmproxy:{{{team}}}:*")
            finally:
                client.close()
            assert bool(keys) == (node.port == owner.port)


async def _steady_calls(
    urls: list[str],
    team: str,
    seen: list[tuple[float, int, str]],
    stop: asyncio.Event,
    pause: float = 0.05,
) -> None:
    """Calls of ``team`` one after another, ``pause`` seconds apart, round robin, until
    ``stop``: (time, status, body) of each into ``seen``."""
    headers = {"Authorization": f"Bearer {_key(team)}"}
    async with aiohttp.ClientSession() as http:
        i = 0
        while not stop.is_set():
            url = urls[i % len(urls)] + "/v1/chat/completions"
            async with http.post(url, json=BODY, headers=headers) as resp:
                seen.append((time.monotonic(), resp.status, await resp.text()))
            i += 1
            await asyncio.sleep(pause)


# The bound: once a replica is promoted, the proxy enforces limits through Redis
# again within the node timeout + 2 s. By design it follows within REFRESH_EVERY
# (0.5 s) of the promotion, plus a call's round trip.
RECOVERED_AFTER = NODE_TIMEOUT_MS / 1000 + 2.0


@pytest.mark.parametrize("on_error", ["fail_open", "fail_closed"])
async def test_a_primary_killed_under_load(
    tmp_path: Path,
    wandb: Upstream,
    prime: Upstream,
    redis_cluster: RedisCluster,
    stopped_at_end: list[ProxyProcess],
    on_error: str,
) -> None:
    """kill -9 of the primary that owns a team's slot while its calls flow. fail_open:
    no 5xx; fail_closed: 503 rate_limiter_unavailable, and only until a replica took
    over. Soon after the promotion the two processes enforce the team's limit through
    Redis again: together they admit exactly the limit, not one each."""
    team = "alpha"
    text = routes_yaml(wandb, prime) + _teams_yaml(
        redis_cluster.url, "{requests_per_minute: 30000}", on_error
    )
    stopped_at_end += await _processes(tmp_path, text, 2)
    urls = [p.url for p in stopped_at_end]
    assert Counter(await _burst(urls, team, 10)) == {200: 10}  # topology learned
    owner = redis_cluster.owner(f"{{{team}}}")
    assert owner.process is not None
    owner.process.send_signal(signal.SIGKILL)
    owner.process.wait()
    owner.process = None
    killed_at = time.monotonic()
    seen: list[tuple[float, int, str]] = []
    stop = asyncio.Event()
    calls = asyncio.ensure_future(_steady_calls(urls, team, seen, stop))
    await asyncio.to_thread(redis_cluster.wait_until_ok)  # a replica took the slots
    promoted_at = time.monotonic()
    await asyncio.sleep(RECOVERED_AFTER)
    errors = await _redis_errors(urls)
    assert Counter(await _burst(urls, team, 20)) == {200: 20}
    assert await _redis_errors(urls) == errors  # through Redis again, both processes
    stop.set()
    await calls
    failed = [(t - killed_at, status, body) for t, status, body in seen if status != 200]
    print(f"promoted {promoted_at - killed_at:.2f} s after the kill")
    if on_error == "fail_open":
        assert failed == []
    else:
        assert failed, "no call was refused while the slot had no owner"
        for t, status, body in failed:
            assert status == 503 and t < promoted_at - killed_at + RECOVERED_AFTER
            assert json.loads(body)["error"]["code"] == "rate_limiter_unavailable"
    # The limit is the team's, not each process's: with 40 a minute the two processes
    # admit 40 together, where falling back to their own limits they would admit 40 each.
    (tmp_path / "routes.yaml").write_text(
        text.replace("{requests_per_minute: 30000}", "{requests_per_minute: 40}")
    )
    for process in stopped_at_end:
        process.signal(signal.SIGHUP)
    await asyncio.sleep(0.5)  # the reload polls every 100 ms
    assert Counter(await _burst(urls, team, 120)) == {200: 40, 429: 80}


async def _redis_errors(urls: list[str]) -> list[float]:
    async with aiohttp.ClientSession() as http:
        return [(await scrape(http, url)).value("llm_proxy_redis_errors_total") for url in urls]


async def test_a_team_s_slot_moved_under_load_fails_no_call_and_keeps_its_limit(
    tmp_path: Path,
    wandb: Upstream,
    prime: Upstream,
    redis_cluster: RedisCluster,
    stopped_at_end: list[ProxyProcess],
) -> None:
    """``redis-cli --cluster reshard`` of a team's slot while its calls flow: the
    processes follow ASK and MOVED; no call fails, none falls back to a process's own
    limits, and the team's limit holds across the move."""
    team, limit = "delta", 100
    text = routes_yaml(wandb, prime) + _teams_yaml(
        redis_cluster.url, f"{{requests_per_minute: {limit}}}"
    )
    stopped_at_end += await _processes(tmp_path, text, 2)
    urls = [p.url for p in stopped_at_end]
    seen: list[tuple[float, int, str]] = []
    stop = asyncio.Event()
    started = time.monotonic()
    calls = [asyncio.ensure_future(_steady_calls(urls, team, seen, stop, 0)) for _ in range(8)]
    await asyncio.sleep(0.3)
    target = await asyncio.to_thread(redis_cluster.move_slot, f"{{{team}}}")
    # On until the limit is reached (however slow the machine), past the move.
    await eventually(lambda: any(status == 429 for _, status, _ in seen), 30)
    stop.set()
    await asyncio.gather(*calls)
    elapsed = time.monotonic() - started
    statuses = Counter(status for _, status, _ in seen)
    assert set(statuses) <= {200, 429} and statuses[429] > 0  # the limit was reached
    # The bucket: the limit at the start, and what refills while the calls last.
    assert limit <= statuses[200] <= limit + elapsed * limit / 60 + 1
    assert redis_cluster.owner(f"{{{team}}}").port == target.port
    assert not any("redis failed" in p.log() for p in stopped_at_end)


async def test_with_ledger_replicas_a_failover_loses_no_ledger_write(
    tmp_path: Path,
    wandb: Upstream,
    prime: Upstream,
    redis_cluster: RedisCluster,
    stopped_at_end: list[ProxyProcess],
) -> None:
    """``ledger_replicas: 1``: a settlement counts as written once a replica has it, so
    the kill -9 of the team's primary under load loses none. The promoted replica has
    no replica of its own until the killed node rejoins as one: until then settlements
    wait in the processes' queues. The ledger then books exactly the calls answered and
    the tokens the upstream reported for them."""
    team = "alpha"
    text = routes_yaml(wandb, prime) + _teams_yaml(
        redis_cluster.url, "{requests_per_minute: 30000}", replicas=1
    )
    stopped_at_end += await _processes(tmp_path, text, 2)
    urls = [p.url for p in stopped_at_end]
    seen: list[tuple[float, int, str]] = []
    stop = asyncio.Event()
    calls = [asyncio.ensure_future(_steady_calls(urls, team, seen, stop, 0)) for _ in range(4)]
    await asyncio.sleep(0.5)
    owner = redis_cluster.owner(f"{{{team}}}")
    assert owner.process is not None
    owner.process.send_signal(signal.SIGKILL)
    owner.process.wait()
    owner.process = None
    await asyncio.to_thread(redis_cluster.wait_until_ok)
    await asyncio.sleep(1.0)
    await owner.restart()  # back as the new primary's replica
    await asyncio.to_thread(redis_cluster.wait_until_ok)
    stop.set()
    await asyncio.gather(*calls)
    answered = [body for _, status, body in seen if status == 200]
    assert len(answered) == len(seen)  # fail_open: every call was answered
    usage = [json.loads(body)["usage"] for body in answered]

    async def booked() -> dict[str, int]:
        return await _ledger(urls[0])

    deadline = time.monotonic() + 10
    while (await booked()).get(team) != len(answered) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the queued settlements are sent again every 0.5 s
    assert await booked() == {team: len(answered)}
    assert await _ledger(urls[0], "prompt_tokens") == {team: sum(u["prompt_tokens"] for u in usage)}
    completion = sum(u["completion_tokens"] for u in usage)
    assert await _ledger(urls[0], "completion_tokens") == {team: completion}
