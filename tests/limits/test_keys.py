"""Named team keys: their entries in routes.yaml, expiry on the clock at each call,
rotation, reload, keygen's entry, and the access log that names the key, never shows it."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from proxy.call.auth import authenticate, key_hash
from proxy.call.record import CallRecord
from proxy.config.load import ConfigError, parse_config
from proxy.errors import InvalidApiKey
from proxy.services import SERVICES
from tests.conftest import PRIME_KEY, WANDB_KEY, MakeProxy, Proxy
from tests.support import ROOT, Upstream, routes_yaml

OLD_KEY = "sk-proxy-old-0123456789"
NEW_KEY = "sk-proxy-new-0123456789"
OPS_KEY = "sk-proxy-ops-0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]
BASE = """
providers: {p: {base_url: "http://127.0.0.1:9/v1"}}
models: {m: {targets: [{provider: p, model: x}]}}
"""
# 2030-01-01T00:00:00Z
Y2030 = datetime(2030, 1, 1, tzinfo=UTC).timestamp()


def _config(teams: str) -> Any:
    return parse_config(BASE + teams, {})


def _errors(teams: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _config(teams)
    return caught.value.errors


def _rotation_yaml(expires: str = '"2030-01-01"') -> str:
    return f"""
teams:
  research:
    keys:
      - {{name: old, hash: "{key_hash(OLD_KEY)}", expires: {expires}}}
      - {{name: new, hash: "{key_hash(NEW_KEY)}"}}
  ops:
    keys: ["{key_hash(OPS_KEY)}"]
"""


async def _chat(proxy: Proxy, key: str | None, model: str = "llama-8b") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"model": model, "messages": MESSAGES}
    async with proxy.http.post(
        proxy.url + "/v1/chat/completions", json=payload, headers=headers
    ) as resp:
        return resp.status, json.loads(await resp.read())


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxy.access"]


def test_a_key_is_a_name_a_hash_and_an_expiry_or_a_bare_hash():
    digest = key_hash(NEW_KEY)
    config = _config(f"""
teams:
  t:
    keys:
      - "{key_hash(OLD_KEY)}"
      - {{name: laptop, hash: "{digest}"}}
      - {{name: ci.2026, hash: "{key_hash("a")}", expires: 2030-01-01}}
      - {{name: quoted, hash: "{key_hash("b")}", expires: "2030-01-01"}}
      - {{name: alice@home, hash: "{key_hash("c")}", expires: 2030-01-01T01:00:00+01:00}}
      - {{name: zulu, hash: "{key_hash("d")}", expires: "2030-01-01T00:00:00Z"}}
""")
    keys = config.teams["t"].keys
    # A bare hash is named by its first 12 hex digits: enough to tell it apart, nothing
    # about the key.
    assert keys[0].name == key_hash(OLD_KEY)[:19] and keys[0].expires is None
    assert (keys[1].team, keys[1].name, keys[1].hash) == ("t", "laptop", digest)
    # A date is 00:00 UTC of that day, quoted or not; a time counts with its offset.
    assert [k.expires for k in keys[2:]] == [Y2030] * 4
    assert config.key_index[digest] is keys[1]


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (
            '{name: a, hash: "HASH", expires: 2030-01-01T10:00:00}',
            "teams.t.keys[0].expires: has no UTC offset: add one (Z for UTC, or such as +01:00)",
        ),
        (
            '{name: a, hash: "HASH", expires: "2030-01-01 10:00"}',
            "teams.t.keys[0].expires: has no UTC offset",
        ),
        (
            '{name: a, hash: "HASH", expires: tomorrow}',
            "teams.t.keys[0].expires: must be a date (2026-01-31: refused from 00:00 UTC that "
            "day) or a date and time with its UTC offset (2026-01-31T18:00:00+01:00, or Z for "
            "UTC), got 'tomorrow'",
        ),
        ('{name: a, hash: "HASH", expires: 2030-02-30}', "teams.t.keys[0].expires: must be"),
        ('{name: a, hash: "HASH", expires: 1893456000}', "teams.t.keys[0].expires: must be"),
        ('{name: a, hash: "HASH", expires: }', "teams.t.keys[0].expires: must be"),
        ('{hash: "HASH"}', "teams.t.keys[0].name: is required"),
        ('{name: "a b", hash: "HASH"}', "teams.t.keys[0].name: must be 1 to 64 letters"),
        ('{name: 7, hash: "HASH"}', "teams.t.keys[0].name: must be a string, got int"),
        ('{name: a, hash: "HASH", expire: 2030-01-01}', "teams.t.keys[0].expire: unknown key"),
        ("{name: a}", "teams.t.keys[0].hash: must be 'sha256:' and 64 hex digits, not a key"),
        ("[a]", "teams.t.keys[0]: must be {name, hash, expires} or a bare 'sha256:<hex>' hash"),
    ],
)
def test_a_bad_key_entry_is_a_config_error_with_its_path(entry: str, error: str):
    errors = _errors(f"teams: {{t: {{keys: [{entry.replace('HASH', key_hash(NEW_KEY))}]}}}}\n")
    assert any(e.startswith(error) for e in errors), errors


def test_key_errors_never_echo_what_may_be_a_key():
    errors = _errors(f"""
teams:
  t:
    keys: ["{NEW_KEY}", {{name: "{OLD_KEY}", hash: "{OPS_KEY}"}}]
""")
    assert errors == [
        "teams.t.keys[0]: must be 'sha256:' and 64 hex digits, not a key",
        "teams.t.keys[1].name: looks like a key: a key's name is logged, so it must not be the key",
        "teams.t.keys[1].hash: must be 'sha256:' and 64 hex digits, not a key",
    ]
    for key in (NEW_KEY, OLD_KEY, OPS_KEY):
        assert key not in "\n".join(errors)


def test_names_are_unique_in_a_team_and_a_key_belongs_to_one_entry():
    digest = key_hash(NEW_KEY)
    errors = _errors(f"""
teams:
  t:
    keys:
      - {{name: a, hash: "{digest}"}}
      - {{name: a, hash: "{key_hash(OLD_KEY)}"}}
      - "{digest}"
  u:
    keys: [{{name: a, hash: "{digest}"}}]
""")
    assert errors == [
        "teams.t.keys[1].name: 'a' is also keys[0]'s name",
        "teams.t.keys[2]: the same key is also keys[0]",
        "teams.u.keys[0]: the same key is also team t's",
    ]
    assert _errors("teams: {t: {keys: []}}\n") == [
        "teams.t.keys: must be a non-empty list of keys, each {name, hash, expires} or a bare "
        "'sha256:<hex>' hash (python -m proxy keygen TEAM --name NAME prints one)"
    ]


def test_a_key_expired_already_is_a_warning_not_an_error():
    config = _config(_rotation_yaml(expires="2001-01-01"))
    assert config.warnings == (
        "teams.research.keys: key 'old' expired at 2001-01-01T00:00:00Z and is refused; "
        "remove it once its clients have moved to another key",
    )


def test_expiry_is_read_on_the_clock_at_each_call():
    config = _config(_rotation_yaml())
    headers = {"Authorization": f"Bearer {OLD_KEY}"}
    record = CallRecord(request_id="r")
    authenticate(headers, config, record, lambda: Y2030 - 0.001)
    assert (record.team, record.key) == ("research", "old")
    record = CallRecord(request_id="r")
    with pytest.raises(InvalidApiKey) as refused:
        authenticate(headers, config, record, lambda: Y2030)  # refused from that instant
    assert refused.value.message == (
        "The API key 'old' of team 'research' expired at 2030-01-01T00:00:00Z. Ask for a new key."
    )
    # Named on the record all the same: the access log shows who still uses it.
    assert (record.team, record.key) == ("research", "old")
    record = CallRecord(request_id="r")
    authenticate({"Authorization": f"Bearer {NEW_KEY}"}, config, record, lambda: Y2030 + 1e9)
    assert (record.team, record.key) == ("research", "new")


async def test_rotation_two_keys_then_the_old_one_expires(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="proxy.access")
    proxy = await make_proxy(routes_yaml(wandb, prime) + _rotation_yaml())
    now = [Y2030 - 60.0]
    proxy.app[SERVICES].clock = lambda: now[0]
    # Both keys of the team work at once while clients move from one to the other.
    assert (await _chat(proxy, OLD_KEY))[0] == 200
    assert (await _chat(proxy, NEW_KEY))[0] == 200
    now[0] = Y2030
    status, body = await _chat(proxy, OLD_KEY)
    assert status == 401
    assert body["error"] == {
        "message": "The API key 'old' of team 'research' expired at 2030-01-01T00:00:00Z. "
        "Ask for a new key.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert (await _chat(proxy, NEW_KEY))[0] == 200
    assert (await _chat(proxy, OPS_KEY))[0] == 200
    assert len(wandb.fake.seen) == 4  # the expired key reached no upstream
    lines = _access_lines(caplog)
    assert [(x["team"], x["key"], x["status"]) for x in lines] == [
        ("research", "old", 200),
        ("research", "new", 200),
        ("research", "old", 401),
        ("research", "new", 200),
        ("ops", key_hash(OPS_KEY)[:19], 200),
    ]
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    for secret in (OLD_KEY, NEW_KEY, OPS_KEY, WANDB_KEY, PRIME_KEY):
        assert secret not in logged


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models"])
async def test_a_key_expires_on_the_real_clock_while_the_proxy_runs(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, path: str
):
    # Soon, written as a time with its offset; the file is read once, before that.
    expires = datetime.fromtimestamp(time.time() + 1.5, UTC).isoformat()
    proxy = await make_proxy(routes_yaml(wandb, prime) + _rotation_yaml(f'"{expires}"'))

    async def status() -> int:
        headers = {"Authorization": f"Bearer {OLD_KEY}"}
        if path == "/v1/models":
            async with proxy.http.get(proxy.url + path, headers=headers) as resp:
                return resp.status
        return (await _chat(proxy, OLD_KEY))[0]

    assert await status() == 200
    deadline = time.monotonic() + 10
    while (answer := await status()) == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert answer == 401
    assert time.time() >= datetime.fromisoformat(expires).timestamp()


async def test_reload_picks_up_a_new_key_and_drops_a_removed_one(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    first = f'teams: {{research: {{keys: [{{name: old, hash: "{key_hash(OLD_KEY)}"}}]}}}}\n'
    proxy = await make_proxy(routes_yaml(wandb, prime) + first)
    assert (await _chat(proxy, OLD_KEY))[0] == 200
    assert (await _chat(proxy, NEW_KEY))[0] == 401
    proxy.write_config(routes_yaml(wandb, prime) + _rotation_yaml())
    await _until(lambda: _chat(proxy, NEW_KEY), 200)
    assert (await _chat(proxy, OLD_KEY))[0] == 200
    rotated = f'teams: {{research: {{keys: [{{name: new, hash: "{key_hash(NEW_KEY)}"}}]}}}}\n'
    proxy.write_config(routes_yaml(wandb, prime) + rotated)
    await _until(lambda: _chat(proxy, OLD_KEY), 401)
    _, body = await _chat(proxy, OLD_KEY)
    assert body["error"]["message"] == "Incorrect API key provided: sk-p****89."
    assert (await _chat(proxy, NEW_KEY))[0] == 200


async def _until(call: Any, status: int) -> None:
    deadline = time.monotonic() + 10
    while (await call())[0] != status:
        assert time.monotonic() < deadline, f"never {status}"
        await asyncio.sleep(0.05)


def _keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "keygen", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("team", "name", "expires"),
    [
        ("research", "laptop", None),
        ("research", "ci", "2099-01-31"),
        ("my team", "true", "2099-01-31T18:00:00+01:00"),  # quoted where YAML would not
    ],
)
async def test_keygen_s_entry_pasted_into_routes_yaml_authenticates_its_key(
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
    caplog: pytest.LogCaptureFixture,
    team: str,
    name: str,
    expires: str | None,
):
    caplog.set_level(logging.INFO, logger="proxy.access")
    result = _keygen(team, "--name", name, *(["--expires", expires] if expires else []))
    assert result.returncode == 0, result.stderr
    first, said, *entry = result.stdout.splitlines()
    key = first.split("(shown once, store it now): ", 1)[1]
    assert key.startswith("sk-proxy-") and len(key) > 40
    assert said.endswith("in routes.yaml (the key is stored nowhere):")
    snippet = "\n".join(entry)
    assert key not in snippet
    parsed = yaml.safe_load(snippet)
    assert list(parsed["teams"]) == [team]
    (written,) = parsed["teams"][team]["keys"]
    assert (written["name"], written["hash"]) == (name, key_hash(key))
    proxy = await make_proxy(routes_yaml(wandb, prime) + snippet + "\n")
    (loaded,) = proxy.holder.current.teams[team].keys
    if expires is None:
        assert loaded.expires is None and "expires" not in written
    else:
        assert loaded.expires == datetime.fromisoformat(expires).timestamp()
        assert datetime.fromtimestamp(loaded.expires, UTC).isoformat()[:19] in first
    assert (await _chat(proxy, key))[0] == 200
    assert [(x["team"], x["key"]) for x in _access_lines(caplog)] == [(team, name)]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "the following arguments are required: --name"),
        (["--name", "a b"], "--name must be 1 to 64 letters"),
        (["--name", "sk-proxy-x"], "--name looks like a key"),
        (["--name", "a", "--expires", "2099-01-31T10:00"], "--expires has no UTC offset"),
        (["--name", "a", "--expires", "31/01/2099"], "--expires must be a date"),
        (["--name", "a", "--expires", "2001-01-01"], "--expires 2001-01-01T00:00:00Z has passed"),
    ],
)
def test_keygen_refuses_a_bad_name_or_date_and_prints_no_key(args: list[str], error: str):
    result = _keygen("research", *args)
    assert result.returncode == 2
    assert error in result.stderr
    assert result.stdout == ""
