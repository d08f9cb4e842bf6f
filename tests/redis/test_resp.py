"""The RESP2 codec and the URL reading of the lean client, without a server."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.limits.redis_store import TeamParts, admit_args, check_key, settle_parts
from proxy.limits.store import KIND_CODES, Check, Settlement, TeamChecks
from proxy.redis.batch import Batch
from proxy.redis.client import Address
from proxy.redis.protocol import Parser, ProtocolError, RespError, Script, encode

# Every reply type, nested and null ones included, and bulk data that holds CRLF.
STREAM = (
    b"+OK\r\n"
    b"-NOSCRIPT No matching script.\r\n"
    b":-42\r\n"
    b"$5\r\nhe\r\no\r\n"
    b"$0\r\n\r\n"
    b"$-1\r\n"
    b"*-1\r\n"
    b"*0\r\n"
    b"*5\r\n:1\r\n:0\r\n$3\r\n0.5\r\n*2\r\n$1\r\na\r\n$-1\r\n-ERR inside\r\n"
)


def check(replies: list[object]) -> None:
    assert len(replies) == 9
    assert replies[0] == "OK"
    assert isinstance(replies[1], RespError) and replies[1].message.startswith("NOSCRIPT")
    assert replies[2:8] == [-42, b"he\r\no", b"", None, None, []]
    last = replies[8]
    assert isinstance(last, list) and last[:4] == [1, 0, b"0.5", [b"a", None]]
    assert isinstance(last[4], RespError) and last[4].message == "ERR inside"


def feed(chunks: list[bytes]) -> list[object]:
    parser = Parser()
    return [reply for chunk in chunks for reply in parser.feed(chunk)]


def test_a_stream_parses_whole_and_split_at_every_byte():
    check(feed([STREAM]))
    check(feed([STREAM[i : i + 1] for i in range(len(STREAM))]))
    for cut in range(len(STREAM) + 1):
        check(feed([STREAM[:cut], STREAM[cut:]]))


@given(st.lists(st.integers(0, len(STREAM)), max_size=30))
def test_a_stream_parses_split_anywhere(cuts: list[int]):
    bounds = [0, *sorted(cuts), len(STREAM)]
    check(feed([STREAM[a:b] for a, b in itertools.pairwise(bounds)]))


def test_a_command_is_an_array_of_bulk_strings():
    command = encode(["EVALSHA", b"\x00\r\n", 2, -7, 0.25, "é"])
    assert (
        command == b"*6\r\n$7\r\nEVALSHA\r\n$3\r\n\x00\r\n\r\n$1\r\n2\r\n$2\r\n-7\r\n"
        b"$4\r\n0.25\r\n$2\r\n\xc3\xa9\r\n"
    )
    assert feed([command]) == [[b"EVALSHA", b"\x00\r\n", b"2", b"-7", b"0.25", "é".encode()]]
    with pytest.raises(TypeError):
        encode([True])


def test_bytes_that_are_not_resp_are_refused():
    with pytest.raises(ProtocolError):
        Parser().feed(b"?what\r\n")
    with pytest.raises(ProtocolError):
        Parser().feed(b"$x\r\n")


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://localhost", Address()),
        ("redis://10.0.0.5:6380/3", Address(host="10.0.0.5", port=6380, db=3)),
        ("redis://:p%40ss@h", Address(host="h", password="p@ss")),
        ("redis://alice:secret@h:1/2", Address("h", 1, username="alice", password="secret", db=2)),
        ("rediss://h:6390", Address(host="h", port=6390, tls=True)),
        ("redis://[::1]:7000/", Address(host="::1", port=7000)),
        ("unix:///run/redis.sock?db=4", Address(path="/run/redis.sock", db=4)),
        ("unix://:pw@/run/redis.sock", Address(path="/run/redis.sock", password="pw")),
    ],
)
def test_urls_read_as_redis_py_reads_them(url: str, address: Address):
    assert Address.from_url(url) == address


def test_the_handshake_authenticates_then_selects():
    assert Address().handshake() == []
    assert Address(password="pw", db=2).handshake() == [("AUTH", "pw"), ("SELECT", 2)]
    assert Address(username="u", password="pw").handshake() == [("AUTH", "u", "pw")]
    with pytest.raises(ValueError):
        Address.from_url("http://localhost")


def _settlement(request_id: str, checks: tuple[Check, ...]) -> Settlement:
    """A settlement of 12 + 7 tokens (estimated) of 1234 reserved, costing 3456 µ$ of
    the 567 its budgets held."""
    return Settlement(
        request_id, TeamChecks("team-a", checks), "gpt", 20000, 1234, 12, 7, True, 3456, "ab12",
        reserved_cost=567,
    )  # fmt: skip


@pytest.mark.parametrize("limited", [True, False])
@pytest.mark.parametrize("calls", [1, 3])
async def test_a_batch_from_cached_parts_sends_what_encoding_it_whole_sends(
    limited: bool, calls: int
):
    """The Redis store encodes a team's keys and limits once and its calls' own parts
    when they come; a batch must still send, byte for byte, the command its whole
    argument list encodes to: shared keys, the calls' keys, the call count, shared
    arguments, the calls' arguments."""
    checks = (
        (
            Check("*", "requests_per_minute", 100),
            Check("gpt", "concurrent", 3),
            Check("*", "tokens_per_day", 10**9),
            Check("gpt", "daily_usd", 5 * 10**6),
        )
        if limited
        else ()
    )
    admit, settle = Script.of("return 1"), Script.of("return 2")
    parts = TeamParts.of("team-a", checks, admit, settle)
    keys = [check_key("team-a", c) for c in checks]
    limits = [x for c in checks for x in (KIND_CODES[c.kind], c.limit)]
    ids = [f"req-{i}" for i in range(calls)]

    batch = Batch(parts.admit, asyncio.get_running_loop(), lambda command, receiver: None)
    for i in ids:
        batch.add(b"", admit_args(i, 30.0, 1234, 567))
    assert batch.encode() == encode(
        [
            "EVALSHA",
            admit.sha,
            len(keys),
            *keys,
            calls,
            *limits,
            *(x for i in ids for x in (i, 30.0, 1234, 567)),
        ]
    )

    batch = Batch(parts.settle, asyncio.get_running_loop(), lambda command, receiver: None)
    for i in ids:
        batch.add(*settle_parts(_settlement(i, checks)))
    assert batch.encode(by_body=True) == encode(
        [
            "EVAL",
            b"return 2",
            1 + len(keys) + 2 * calls,
            "llmproxy:{team-a}:ledger-index",
            *keys,
            *(
                k
                for i in ids
                for k in (f"llmproxy:{{team-a}}:done:{i}", "llmproxy:{team-a}:ledger:20000:gpt")
            ),
            calls,
            *limits,
            *(x for i in ids for x in (20000, "gpt", i, 1234, 19, 12, 7, 1, 3456, "ab12", 567)),
        ]
    )


async def test_a_team_s_batched_scripts_on_the_wire():
    """Literal bytes: the keys under the team's hash tag, the limits as (kind, limit)
    pairs, each call's own arguments after them."""
    checks = (
        Check("*", "requests_per_minute", 100),
        Check("gpt", "concurrent", 3),
        Check("*", "tokens_per_day", 10**9),
    )
    parts = TeamParts.of("team-a", checks, Script.of("return 1"), Script.of("return 2"))
    batch = Batch(parts.admit, asyncio.get_running_loop(), lambda command, receiver: None)
    batch.add(b"", admit_args("req-0", 30.0, 1234, 567))
    batch.add(b"", admit_args("req-1", 30.0, 1234))  # holds no cost: 0
    assert batch.encode() == (
        b"*21\r\n$7\r\nEVALSHA\r\n$40\r\ne0e1f9fabfc9d4800c877a703b823ac0578ff8db\r\n"
        b"$1\r\n3\r\n$23\r\nllmproxy:{team-a}:rpm:*\r\n$26\r\nllmproxy:{team-a}:conc:gpt\r\n"
        b"$23\r\nllmproxy:{team-a}:tpd:*\r\n$1\r\n2\r\n"
        b"$1\r\n1\r\n$3\r\n100\r\n$1\r\n3\r\n$1\r\n3\r\n$1\r\n4\r\n$10\r\n1000000000\r\n"
        b"$5\r\nreq-0\r\n$4\r\n30.0\r\n$4\r\n1234\r\n$3\r\n567\r\n"
        b"$5\r\nreq-1\r\n$4\r\n30.0\r\n$4\r\n1234\r\n$1\r\n0\r\n"
    )
    batch = Batch(parts.settle, asyncio.get_running_loop(), lambda command, receiver: None)
    batch.add(*settle_parts(_settlement("req-0", checks)))
    assert batch.encode(by_body=True) == (
        b"*27\r\n$4\r\nEVAL\r\n$8\r\nreturn 2\r\n$1\r\n6\r\n"
        b"$30\r\nllmproxy:{team-a}:ledger-index\r\n$23\r\nllmproxy:{team-a}:rpm:*\r\n"
        b"$26\r\nllmproxy:{team-a}:conc:gpt\r\n$23\r\nllmproxy:{team-a}:tpd:*\r\n"
        b"$28\r\nllmproxy:{team-a}:done:req-0\r\n$34\r\nllmproxy:{team-a}:ledger:20000:gpt\r\n"
        b"$1\r\n1\r\n"
        b"$1\r\n1\r\n$3\r\n100\r\n$1\r\n3\r\n$1\r\n3\r\n$1\r\n4\r\n$10\r\n1000000000\r\n"
        b"$5\r\n20000\r\n$3\r\ngpt\r\n$5\r\nreq-0\r\n$4\r\n1234\r\n$2\r\n19\r\n$2\r\n12\r\n"
        b"$1\r\n7\r\n$1\r\n1\r\n$4\r\n3456\r\n$4\r\nab12\r\n$3\r\n567\r\n"
    )
