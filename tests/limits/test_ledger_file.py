"""The embedded ledger loses nothing (issue 20, part 8): without Redis, real
``python -m proxy serve`` processes keep the ledger in a SQLite file, read it back at
start, and say where it lives; SIGTERM loses nothing, SIGKILL at most the last
``accounting.ledger_interval``; several workers, and a file that is not a ledger."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.call.auth import key_hash
from tests.support import ProxyProcess, Upstream, free_port, routes_yaml, serve_and_exit
from tests.support.metrics import scrape

ADMIN = "admin-secret-key"
KEYS = {"research": "sk-proxy-research-0123456789", "ops": "sk-proxy-ops-0123456789"}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _config(wandb: Upstream, prime: Upstream, accounting: str, day_limit: int = 10**6) -> str:
    """Two teams, research with two named keys and a tokens_per_day limit; wandb priced,
    so the ledger books micro-dollars too."""
    priced = routes_yaml(wandb, prime).replace(
        "    headers: {OpenAI-Project: acme/research}\n",
        "    headers: {OpenAI-Project: acme/research}\n    price: {input: 2, output: 8}\n",
    )
    research = [{"name": "laptop", "key": KEYS["research"]}, {"name": "ci", "key": _ci_key()}]
    keys = ", ".join(f'{{name: {k["name"]}, hash: "{key_hash(k["key"])}"}}' for k in research)
    return (
        priced
        + f"""
admin_key: {ADMIN}
accounting: {{default_max_tokens: 20, {accounting}}}
teams:
  research:
    keys: [{keys}]
    limits: {{tokens_per_day: {day_limit}}}
  ops:
    keys: ["{key_hash(KEYS["ops"])}"]
"""
    )


def _ci_key() -> str:
    return "sk-proxy-research-ci-0123456789"


@dataclass
class Setup:
    """The test's routes.yaml and port, kept across restarts, and its processes."""

    wandb: Upstream
    prime: Upstream
    path: Path
    port: int
    http: aiohttp.ClientSession
    started: list[ProxyProcess]

    def write(self, accounting: str, day_limit: int = 10**6) -> None:
        self.path.write_text(_config(self.wandb, self.prime, accounting, day_limit))

    async def start(self, *args: str, workers: int = 1) -> ProxyProcess:
        process = ProxyProcess(self.path, self.port, *args)
        self.started.append(process)
        await process.wait_listening(workers=workers)
        return process


@pytest.fixture
async def setup(tmp_path: Path, wandb: Upstream, prime: Upstream) -> AsyncIterator[Setup]:
    async with aiohttp.ClientSession() as http:
        setup = Setup(wandb, prime, tmp_path / "routes.yaml", free_port(), http, [])
        yield setup
        for process in setup.started:
            process.stop()


async def _call(http: aiohttp.ClientSession, url: str, key: str) -> int:
    body = {"model": "llama-8b", "messages": MESSAGES, "max_tokens": 5}
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def _calls(http: aiohttp.ClientSession, url: str, count: int) -> None:
    """``count`` calls from each of the three keys, all answered."""
    for _ in range(count):
        for key in (KEYS["research"], _ci_key(), KEYS["ops"]):
            assert await _call(http, url, key) == 200


async def _usage(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with http.get(url + "/v1/usage", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


async def test_sigterm_and_restart_keep_the_whole_ledger_and_the_day_s_tokens(setup: Setup) -> None:
    # Room for 4 research calls today: the fake books 15 prompt and 5 completion tokens
    # a call (80 for 4), and a 5th reserves its prompt's estimate (14) + 5: over 95.
    setup.write("ledger_interval: 10s", day_limit=95)
    first = await setup.start()
    await _calls(setup.http, first.url, 2)
    before = await _usage(setup.http, first.url)
    file = str(setup.path.parent / "ledger.sqlite3")  # the default: beside routes.yaml
    assert before["ledger"] == {"store": "sqlite", "path": file, "interval": 10.0}
    research = [row for row in before["data"] if row["team"] == "research"]
    assert research[0]["requests"] == 4 and research[0]["cost_micro_usd"] > 0
    assert set(research[0]["keys"]) == {"laptop", "ci"}
    # Within the 10 s interval: only the shutdown's write can have kept these.
    assert first.stop() == 0
    assert f"ledger kept in {file}" in first.log()

    second = await setup.start()
    after = await _usage(setup.http, second.url)
    assert after["data"] == before["data"] and after["totals"] == before["totals"]
    assert "3 recent rows read back" in second.log()  # research's 2 keys, and ops
    # The day's 80 tokens were used before the restart: the limit still counts them.
    assert await _call(setup.http, second.url, KEYS["research"]) == 429
    assert await _call(setup.http, second.url, KEYS["ops"]) == 200
    ops = [r for r in (await _usage(setup.http, second.url))["data"] if r["team"] == "ops"]
    assert ops[0]["requests"] == 3


async def test_sigkill_loses_at_most_the_last_interval(setup: Setup) -> None:
    setup.write("ledger_interval: 200ms")
    first = await setup.start()
    await _calls(setup.http, first.url, 3)
    kept = await _usage(setup.http, first.url)
    await asyncio.sleep(0.6)  # more than the interval: every call above is in the file
    await _calls(setup.http, first.url, 2)  # within the interval of the kill: may be lost
    first.signal(signal.SIGKILL)
    first.process.wait()

    second = await setup.start()
    after = await _usage(setup.http, second.url)
    assert 9 <= after["totals"]["requests"] <= 15
    for row in kept["data"]:  # each row at least as it was, every field
        now = next(r for r in after["data"] if r["team"] == row["team"])
        for field in ("requests", "prompt_tokens", "completion_tokens", "cost_micro_usd"):
            assert now[field] >= row[field]
    await asyncio.sleep(0.6)
    # What the second process books is added to what the first left.
    await _calls(setup.http, second.url, 1)
    final = await _usage(setup.http, second.url)
    assert final["totals"]["requests"] == after["totals"]["requests"] + 3


async def test_workers_share_one_file_and_every_worker_reads_all_of_it(setup: Setup) -> None:
    setup.write("ledger_interval: 100ms")
    proxy = await setup.start("--workers", "2", workers=2)
    # New connections each: the kernel spreads them over both workers.
    for _ in range(10):
        async with aiohttp.ClientSession() as fresh:
            await _calls(fresh, proxy.url, 1)
    await asyncio.sleep(0.5)  # every worker's last write is in
    for _ in range(4):  # whichever worker answers sees every worker's calls
        async with aiohttp.ClientSession() as fresh:
            assert (await _usage(fresh, proxy.url))["totals"]["requests"] == 30
    assert proxy.stop() == 0
    restarted = await setup.start("--workers", "2", workers=2)
    assert (await _usage(setup.http, restarted.url))["totals"]["requests"] == 30
    await _calls(setup.http, restarted.url, 1)
    await asyncio.sleep(0.3)
    writes = await scrape(setup.http, restarted.url)  # every worker's, under --workers
    assert writes.value("llm_proxy_ledger_file_writes_total", result="ok") >= 1
    assert writes.value("llm_proxy_ledger_file_writes_total", result="error") == 0


async def test_a_file_that_refuses_writes_costs_no_call_and_is_shown_then_caught_up(
    setup: Setup,
) -> None:
    """Another process holds the file's write lock for longer than a write waits
    (BUSY_TIMEOUT): calls are answered, the failed writes are logged and counted, and
    once the lock is gone the next write adds everything."""
    setup.write("ledger_interval: 200ms")
    proxy = await setup.start()
    await _calls(setup.http, proxy.url, 1)
    await asyncio.sleep(0.5)  # written
    locker = sqlite3.connect(setup.path.parent / "ledger.sqlite3", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        await _calls(setup.http, proxy.url, 2)  # answered while no write can go in
        errors = 0.0
        while errors == 0:  # a write waits up to BUSY_TIMEOUT (5 s), then fails
            await asyncio.sleep(0.2)
            found = await scrape(setup.http, proxy.url)
            errors = found.value("llm_proxy_ledger_file_writes_total", result="error")
    finally:
        locker.close()
    assert "ledger not written (1 failed writes so far" in proxy.log()
    assert "database is locked" in proxy.log()
    usage = await _usage(setup.http, proxy.url)  # its write goes in now: all 9 calls
    assert usage["totals"]["requests"] == 9
    assert proxy.stop() == 0
    restarted = await setup.start()
    assert (await _usage(setup.http, restarted.url))["totals"]["requests"] == 9


def test_a_file_that_is_not_a_ledger_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "providers: {p: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "models: {m: {targets: [{provider: p, model: x}]}}\n"
        "accounting: {ledger_path: state/usage.db}\n"
    )
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "usage.db").write_bytes(b"not a database, " * 512)
    result = serve_and_exit(path, "--port", "0")
    assert result.returncode == 2
    assert f"accounting.ledger_path: ledger file {tmp_path}/state/usage.db: " in result.stderr
    assert "file is not a database" in result.stderr


async def test_ledger_path_null_keeps_it_in_memory_and_writes_no_file(setup: Setup) -> None:
    setup.write("ledger_path: null")
    proxy = await setup.start()
    await _calls(setup.http, proxy.url, 1)
    usage = await _usage(setup.http, proxy.url)
    assert usage["ledger"] == {"store": "memory"} and usage["totals"]["requests"] == 3
    assert proxy.stop() == 0
    assert "ledger kept in memory only" in proxy.log()
    assert not await asyncio.to_thread(lambda: list(setup.path.parent.glob("*.sqlite3*")))


def test_the_file_is_sqlite_with_every_ledger_field(tmp_path: Path) -> None:
    """What an operator may read with the sqlite3 shell: one table, a column per field."""
    from proxy.limits.ledger_file import LedgerFile
    from proxy.limits.store import LEDGER_FIELDS

    file = LedgerFile(str(tmp_path / "l.sqlite3"))
    assert file.open(today=20_000) == {}
    file.add({("t", "m", 20_000, "k"): (1, 2, 3, 4, 5, 6)})
    file.add({("t", "m", 20_000, "k"): (1, 2, 3, 4, 5, 6), ("t", "m", 19_000, "k"): (1,) * 6})
    file.close()
    with sqlite3.connect(tmp_path / "l.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = [row[1] for row in db.execute("PRAGMA table_info(ledger)")]
        assert columns == ["team", "model", "day", "key", *LEDGER_FIELDS]
    reopened = LedgerFile(str(tmp_path / "l.sqlite3"))
    # Added, not set; and only the recent days come back.
    assert reopened.open(today=20_000) == {("t", "m", 20_000, "k"): (2, 4, 6, 8, 10, 12)}
    reopened.close()
