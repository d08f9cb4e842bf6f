"""The lean Redis client against a real redis-server of the test's own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
import uvloop

from proxy.redis.client import Disconnected, RespClient
from proxy.redis.protocol import RespError, Script
from tests.support.redis_server import RedisServer
from tests.support.teams import need_redis

# Long enough never to fire by accident: a test that sees an error sees the real one.
PATIENT = 30.0
ECHO = Script.of("return {KEYS[1], ARGV[1]}")


def connections_received(private_redis: RedisServer) -> int:
    client = private_redis.client()
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


async def test_concurrent_callers_share_one_connection_and_get_their_own_replies(
    private_redis: RedisServer,
):
    client = RespClient(private_redis.url, PATIENT)
    before = connections_received(private_redis)

    async def caller(n: int) -> list[object]:
        return [await client.execute("INCRBY", f"k{n}", n) for _ in range(20)]

    try:
        results = await asyncio.gather(*(caller(n) for n in range(1, 101)))
        assert results == [[n * i for i in range(1, 21)] for n in range(1, 101)]
        replies = await asyncio.gather(*(client.execute("ECHO", str(n)) for n in range(500)))
        assert replies == [str(n).encode() for n in range(500)]
    finally:
        await client.close()
    assert connections_received(private_redis) - before == 2  # the client's one and this count's


async def test_scripts_are_loaded_on_connecting_so_the_first_call_keeps_its_place(
    private_redis: RedisServer,
):
    """Without the script in Redis's cache a call goes out again as EVAL, a round trip
    later, behind commands sent meanwhile. Loaded on connecting, the first call is one
    EVALSHA, in the order it was sent."""
    client = RespClient(private_redis.url, PATIENT, scripts=(ECHO,))
    try:
        first = client.run_script(ECHO, ["k"], ["first"])
        second = client.execute("ECHO", "second")
        assert list(await asyncio.gather(first, second)) == [[b"k", b"first"], b"second"]
        stats = await client.execute("INFO", "commandstats")
        assert isinstance(stats, bytes)
        evalsha = next(line for line in stats.decode().splitlines() if "evalsha" in line)
        assert "calls=1," in evalsha and "failed_calls=0" in evalsha
        assert b"cmdstat_eval:" not in stats
    finally:
        await client.close()


async def test_a_flushed_script_cache_is_filled_again(private_redis: RedisServer):
    client = RespClient(private_redis.url, PATIENT)
    try:
        assert await client.run_script(ECHO, ["k"], [1]) == [b"k", b"1"]
        assert await client.execute("SCRIPT", "FLUSH") == "OK"
        replies = await asyncio.gather(*(client.run_script(ECHO, ["k"], [n]) for n in range(10)))
        assert replies == [[b"k", str(n).encode()] for n in range(10)]
        assert await client.execute("SCRIPT", "EXISTS", ECHO.sha) == [1]
        assert await client.execute("SET", "k-string", "v") == "OK"
        with pytest.raises(RespError, match="WRONGTYPE"):
            await client.execute("HGET", "k-string", "f")
        assert await client.execute("PING") == "PONG"  # an error reply leaves it usable
    finally:
        await client.close()


async def test_an_acl_that_refuses_script_leaves_calls_to_eval(private_redis: RedisServer):
    admin = RespClient(private_redis.url, PATIENT)
    try:
        acl = ("ACL", "SETUSER", "noscript", "on", ">pw", "~*", "+@all", "-script")
        assert await admin.execute(*acl) == "OK"
    finally:
        await admin.close()
    url = f"redis://noscript:pw@127.0.0.1:{private_redis.port}/0"
    client = RespClient(url, PATIENT, scripts=(ECHO,))
    try:
        with pytest.raises(RespError, match="NOPERM"):
            await client.execute("SCRIPT", "LOAD", ECHO.body)  # the ACL holds
        replies = await asyncio.gather(*(client.run_script(ECHO, ["k"], [n]) for n in range(3)))
        assert replies == [[b"k", str(n).encode()] for n in range(3)]
    finally:
        await client.close()


async def test_a_stopped_redis_fails_at_once_and_a_restarted_one_is_used_again(
    private_redis: RedisServer,
):
    client = RespClient(private_redis.url, PATIENT)
    try:
        waiting = asyncio.ensure_future(client.execute("BLPOP", "never", 0))
        assert await client.execute("PING") == "PONG"  # the BLPOP is in; PING waits behind
        private_redis.kill()
        async with asyncio.timeout(PATIENT / 2):  # sooner than the client's own timeout
            with pytest.raises(Disconnected):
                await waiting
            with pytest.raises(Disconnected):
                await client.execute("PING")
        await private_redis.restart()
        assert await client.execute("PING") == "PONG"
    finally:
        await client.close()


async def test_an_overdue_reply_fails_every_waiting_command_and_the_next_reconnects(
    private_redis: RedisServer,
):
    client = RespClient(private_redis.url, 0.2)
    try:
        blocked = [client.execute("BLPOP", "never", 0), client.execute("ECHO", "behind")]
        results = await asyncio.gather(*blocked, return_exceptions=True)
        assert all(isinstance(r, Disconnected) and "no reply" in str(r) for r in results)
        # A new connection: a late reply on the old one can never be taken for this one.
        assert await client.execute("ECHO", "fresh") == b"fresh"
    finally:
        await client.close()


async def test_a_closed_client_fails_what_waits_and_refuses_more(private_redis: RedisServer):
    client = RespClient(private_redis.url, PATIENT)
    waiting = asyncio.ensure_future(client.execute("BLPOP", "never", 0))
    assert await client.execute("PING") == "PONG"
    await client.close()
    with pytest.raises(Disconnected):
        await waiting
    with pytest.raises(Disconnected):
        await client.execute("PING")


async def test_a_password_and_a_database_from_the_url(tmp_path: Path):
    need_redis()
    server = RedisServer(tmp_path, password="s3cret")
    port = server.port
    try:
        admin = server.client()
        admin.acl_setuser(
            "alice", enabled=True, passwords=["+wonder"], keys=["*"], commands=["+@all"]
        )
        admin.close()
        for url in (
            f"redis://:s3cret@127.0.0.1:{port}/3",
            f"redis://alice:wonder@127.0.0.1:{port}/3",
        ):
            client = RespClient(url, PATIENT)
            try:
                assert await client.execute("SET", "where", url) == "OK"
            finally:
                await client.close()
            assert stored(server, db=3) == url
        refused = RespClient(f"redis://:wrong@127.0.0.1:{port}", PATIENT)
        with pytest.raises(RespError, match=r"WRONGPASS|invalid"):
            await refused.execute("PING")
        await refused.close()
    finally:
        server.kill()


def stored(private_redis: RedisServer, db: int) -> str:
    client = redis.Redis(port=private_redis.port, password=private_redis.password, db=db)
    try:
        value = client.get("where")
        assert isinstance(value, bytes)
        return value.decode()
    finally:
        client.close()


async def test_a_unix_socket(tmp_path: Path):
    need_redis()
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, args=("--unixsocket", str(socket_path)))
    client = RespClient(f"unix://{socket_path}?db=2", PATIENT)
    try:
        info = await client.execute("CLIENT", "INFO")
        assert isinstance(info, bytes) and b" db=2 " in info
    finally:
        await client.close()
        server.kill()


def test_on_uvloop_the_proxy_s_own_loop(private_redis: RedisServer):
    # uvloop's transports are not asyncio's classes; the proxy serves on uvloop.
    async def echoes() -> list[object]:
        client = RespClient(private_redis.url, PATIENT)
        try:
            await client.execute("SCRIPT", "FLUSH")
            echoes = await asyncio.gather(*(client.execute("ECHO", n) for n in range(100)))
            return [await client.run_script(ECHO, ["k"], [0]), *echoes]
        finally:
            await client.close()

    assert uvloop.run(echoes()) == [[b"k", b"0"], *(str(n).encode() for n in range(100))]
