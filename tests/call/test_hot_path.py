"""The shortcuts the hot path takes (issue 7) change nothing a caller can see."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.call.body import parse_body
from proxy.config.load import parse_config
from proxy.config.model import RedisSettings
from proxy.errors import RateLimited
from proxy.http.middlewares import request_id
from proxy.limits.admission import Accountant
from proxy.limits.memory import DONE_MAX, MemoryStore
from proxy.limits.store import Settlement, TeamChecks
from proxy.observe.access_log import encode
from tests.support.strategies import SPACES, json_values


def test_request_ids_are_uuid4_hex():
    ids = {request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        assert uuid.UUID(hex=rid).hex == rid  # 32 lower-case hex digits
        assert uuid.UUID(hex=rid).version == 4
        assert uuid.UUID(hex=rid).variant == uuid.RFC_4122


def _settlement(rid: str) -> Settlement:
    return Settlement(
        request_id=rid,
        team_checks=TeamChecks("t", ()),
        model="m",
        day=1,
        reserved=0,
        prompt_tokens=1,
        completion_tokens=1,
        estimated=False,
    )


async def test_memory_dedupe_stays_bounded_and_still_catches_a_retry():
    store = MemoryStore(clock=lambda: 86_400.0 * 1.5)
    for i in range(DONE_MAX * 3):
        await store.settle(_settlement(f"r{i}"))
    assert len(store._done) <= DONE_MAX
    await store.settle(_settlement(f"r{DONE_MAX * 3 - 1}"))  # a retried settlement
    [row] = await store.ledger(["t"], 0, 10)
    assert row.counts[0] == DONE_MAX * 3  # requests: the retry was not booked again


def _config(limits: str):
    return parse_config(
        f"""
providers: {{p: {{base_url: "http://127.0.0.1:9/v1"}}}}
models: {{m: {{targets: [{{provider: p, model: m}}]}}}}
teams: {{t: {{keys: ["sha256:{"0" * 64}"], limits: {limits}}}}}
""",
        {},
    )


async def test_limits_of_a_reloaded_config_apply_at_once():
    """A config's limits are compiled when it is first used; a reload's apply at once."""
    accountant = Accountant(RedisSettings(), MemoryStore(), fallback=None)
    for rid in "ab":
        await accountant.admit(_config("{}"), "t", "m", 1, 1, rid)
    reloaded = _config("{requests_per_minute: 1}")
    await accountant.admit(reloaded, "t", "m", 1, 1, "c")
    with pytest.raises(RateLimited):
        await accountant.admit(reloaded, "t", "m", 1, 1, "d")


async def test_a_call_that_read_the_config_before_a_reload_admits_by_its_limits():
    """Calls that began before a reload and calls after it alternate at admission: each
    is held to the limits of the config it read, not to the newest one."""
    accountant = Accountant(RedisSettings(), MemoryStore(), fallback=None)
    old, new = _config("{concurrent: 1}"), _config("{concurrent: 5}")
    await accountant.admit(new, "t", "m", 1, 1, "a")  # holds one slot
    with pytest.raises(RateLimited):
        await accountant.admit(old, "t", "m", 1, 1, "b")  # 1 of 1 taken, not 1 of 5
    await accountant.admit(new, "t", "m", 1, 1, "c")  # 2 of 5: the old config's 1 is gone


KEY_NAMES = ["model", "messages", "stream_options", "tools", "mod\\u0065l", "x"]
KEYS = st.sampled_from(KEY_NAMES)
VALUES = json_values(KEY_NAMES)


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(KEYS, VALUES, max_size=5), space=SPACES, usage=st.booleans())
def test_a_rewritten_body_changes_the_model_and_the_usage_option_only(
    fields: dict[str, Any], space: str, usage: bool
):
    raw = json.dumps({**fields, "model": "client-name"}, indent=space or None)
    body = parse_body(raw.encode())
    assert body.fields == json.loads(raw)
    sent = json.loads(body.rewritten("upstream-name", include_usage=usage))
    expected = {**json.loads(raw), "model": "upstream-name"}
    if usage:
        options = expected.get("stream_options")
        expected["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    assert sent == expected
    assert body.rewritten("client-name") == raw.encode()  # unchanged: the client's bytes


def test_a_model_key_written_with_an_escape_is_still_the_model():
    body = parse_body(b'{"mod\\u0065l": "client-name", "x": {"model": 1}}')
    assert json.loads(body.rewritten("upstream-name")) == {
        "model": "upstream-name",
        "x": {"model": 1},
    }


def test_the_access_log_encoder_writes_what_json_dumps_writes():
    line = {
        "ts": 1795322614.42,
        "path": "/v1/chat/completions",
        "team": 'caf\u00e9 "x"',
        "model": None,
        "status": 200,
        "attempts": [{"outcome": "ok", "detail": "200"}],
        "tokens_estimated": False,
        "duration_ms": 0.1 + 0.2,
        "big": 10**30,
    }
    assert encode(line) == json.dumps(line)
