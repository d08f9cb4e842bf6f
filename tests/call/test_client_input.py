"""Hostile client input, through a real proxy: bytes in headers, numbers and keys in the
body, headers that scope the provider account. A clear 4xx (or a clean 429), never a 500."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy.call.auth import key_hash
from proxy.config.load import ConfigError, parse_config
from tests.conftest import MakeProxy, Proxy
from tests.support import Upstream, routes_yaml
from tests.support.metrics import scrape
from tests.support.teams import (
    ADMIN_KEY,
    MESSAGES,
    OPS_KEY,
    RESEARCH_KEY,
    MakeTeamProxy,
    chat,
    ledger,
    team_yaml,
)

BODY = json.dumps({"model": "llama-8b", "messages": MESSAGES}).encode()


async def raw_call(
    proxy: Proxy,
    head_lines: list[bytes],
    body: bytes = b"",
    method: bytes = b"POST",
    path: bytes = b"/v1/chat/completions",
) -> tuple[int, Any]:
    """One request written byte for byte (clients will not send invalid UTF-8 in a
    header); the status and the JSON answer."""
    host, port = urlsplit(proxy.url).hostname, urlsplit(proxy.url).port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        framing = [b"Host: proxy", b"Connection: close", b"Content-Length: %d" % len(body)]
        head = [method + b" " + path + b" HTTP/1.1", *framing, *head_lines]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        reply = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = reply.partition(b"\r\n")
    answer = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(answer)


def assert_error(answer: Any, type_: str, param: str | None = None) -> str:
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["param"] == param, error
    message: str = error["message"]
    return message


# 1. Bytes that are not UTF-8 in headers.


async def test_a_key_that_is_not_ascii_is_an_unknown_key(
    team_proxy: MakeTeamProxy, wandb: Upstream
):
    proxy = await team_proxy()
    not_ascii = (b"sk-proxy-\xff\xfe", b"sk-proxy-caf\xc3\xa9", RESEARCH_KEY.encode() + b"\x80")
    for key in not_ascii:
        status, answer = await raw_call(proxy, [b"Authorization: Bearer " + key], BODY)
        assert status == 401, answer
        assert answer["error"]["code"] == "invalid_api_key"
        assert answer["error"]["message"].isascii()
    admin = [b"Authorization: Bearer \xff" + ADMIN_KEY.encode()]
    status, answer = await raw_call(proxy, admin, method=b"GET", path=b"/v1/usage")
    assert status == 403 and answer["error"]["code"] == "admin_key_required"
    assert not wandb.fake.seen


NO_KEY = "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
WRONG_ADMIN = "This endpoint needs the admin key as 'Authorization: Bearer KEY'."


async def test_a_refused_key_is_told_why_and_shown_redacted(
    team_proxy: MakeTeamProxy, wandb: Upstream
):
    proxy = await team_proxy()
    answers = {  # the Authorization header sent: the message of the 401
        None: NO_KEY,
        "Basic " + RESEARCH_KEY: NO_KEY,  # another scheme is no key at all
        "Bearer   ": NO_KEY,
        "Bearer sk-proxy-wrong-key": "Incorrect API key provided: sk-p****ey.",
        "Bearer 123456789": "Incorrect API key provided: 1234****89.",  # 9 characters
        "Bearer 12345678": "Incorrect API key provided: ****.",  # 8: too short to show any
    }
    for header, expected in answers.items():
        head = [b"Authorization: " + header.encode()] if header else []
        status, answer = await raw_call(proxy, head, BODY)
        assert status == 401 and assert_error(answer, "invalid_request_error") == expected
    head = [b"Authorization: Bearer caf\xc3\xa9"]
    status, answer = await raw_call(proxy, head, BODY)
    not_ascii = "Incorrect API key provided: it is not ASCII."
    assert status == 401 and assert_error(answer, "invalid_request_error") == not_ascii
    assert not wandb.fake.seen
    # The scheme's case and the spaces around the key do not matter (RFC 9110 §11.1).
    for header in (f"bearer {RESEARCH_KEY}", f"BEARER  {RESEARCH_KEY} "):
        status, _ = await raw_call(proxy, [b"Authorization: " + header.encode()], BODY)
        assert status == 200, header
    status, answer = await raw_call(proxy, [], method=b"GET", path=b"/v1/usage")
    assert status == 403 and answer["error"]["message"] == WRONG_ADMIN


async def test_the_admin_endpoints_say_they_are_off_without_an_admin_key(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    yaml = routes_yaml(wandb, prime) + team_yaml().replace(f"admin_key: {ADMIN_KEY}\n", "")
    proxy = await make_proxy(yaml)
    admin = [b"Authorization: Bearer " + ADMIN_KEY.encode()]
    status, answer = await raw_call(proxy, admin, method=b"GET", path=b"/v1/usage")
    off = "The admin endpoints are off: set admin_key in routes.yaml."
    assert status == 403 and answer["error"]["message"] == off


async def test_a_header_that_is_not_utf8_is_refused_by_name(
    team_proxy: MakeTeamProxy, wandb: Upstream
):
    proxy = await team_proxy(limits="{requests_per_minute: 1}")
    auth = b"Authorization: Bearer " + RESEARCH_KEY.encode()
    status, answer = await raw_call(proxy, [auth, b"X-Title: caf\xe9"], BODY)
    assert status == 400, answer
    assert "X-Title" in assert_error(answer, "invalid_request_error")
    assert not wandb.fake.seen
    # Refused before admission: the one request a minute is still there, and only the
    # call below is in the ledger. Valid UTF-8 reaches the upstream byte for byte.
    status, answer = await raw_call(proxy, [auth, b"X-Title: caf\xc3\xa9"], BODY)
    assert status == 200, answer
    assert wandb.fake.last.headers["X-Title"] == "café"
    assert (await ledger(proxy))["totals"]["requests"] == 1
    # A header the proxy does not forward is not checked.
    status, answer = await raw_call(proxy, [auth, b"Cookie: caf\xe9"], BODY)
    assert status == 429, answer


# 1. Numbers too big for Python's int parsing, and for the admission's arithmetic.


async def post_text(proxy: Proxy, text: str, key: str = RESEARCH_KEY) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = proxy.url + "/v1/chat/completions"
    async with proxy.http.post(url, data=text.encode(), headers=headers) as resp:
        return resp.status, await resp.json()


async def test_an_integer_of_more_than_4300_digits_is_refused(
    team_proxy: MakeTeamProxy, wandb: Upstream
):
    proxy = await team_proxy()
    for field in ("seed", "max_tokens"):
        text = BODY.decode()[:-1] + f', "{field}": {"9" * 4301}}}'
        status, answer = await post_text(proxy, text)
        assert status == 400, answer
        assert "4300 digits" in assert_error(answer, "invalid_request_error")
    assert not wandb.fake.seen


HUGE = [
    {"max_tokens": 10**30},
    {"n": 10**30},
    {"max_completion_tokens": 10**30, "n": 3},
    {"max_tokens": 10**4000, "n": 10**4000},
]


@pytest.mark.parametrize("fields", HUGE)
async def test_huge_max_tokens_or_n_are_refused_whatever_the_limits(
    team_proxy: MakeTeamProxy, wandb: Upstream, fields: dict[str, Any]
):
    limits = "{tokens_per_minute: 1000, tokens_per_day: 100000}"
    proxy = await team_proxy(limits=limits, model_limits="{llama-8b: {tokens_per_minute: 500}}")
    status, body, _ = await chat(proxy, **fields)
    assert status == 400, body
    message = assert_error(json.loads(body), "invalid_request_error", next(iter(fields)))
    assert "must be at most 2147483647" in message
    assert not wandb.fake.seen


LARGEST = [
    {"max_tokens": 2**31 - 1, "n": 128},
    {"n": 2**31 - 1},
    {"max_completion_tokens": 2**31 - 1, "n": 2**31 - 1},
]


@pytest.mark.parametrize("fields", LARGEST)
async def test_the_largest_max_tokens_and_n_get_a_clean_429(
    team_proxy: MakeTeamProxy, wandb: Upstream, fields: dict[str, Any]
):
    proxy = await team_proxy(limits="{tokens_per_minute: 1000, tokens_per_day: 100000}")
    status, body, headers = await chat(proxy, **fields)
    assert status == 429, body
    message = assert_error(json.loads(body), "rate_limit_error", "tokens_per_minute")
    assert "Lower max_tokens" in message
    assert headers["Retry-After"]
    assert not wandb.fake.seen
    status, _, _ = await chat(proxy, max_tokens=10)  # the refusal took nothing
    assert status == 200


# 2. A field the proxy reads, given twice.


def with_repeat(name: str, first: str, last: str) -> str:
    """A chat body that gives ``name`` twice, the ``first`` value before the others."""
    return f'{{"{name}": {first}, "model": "llama-8b", "messages": [], "{name}": {last}}}'


REPEATS = [
    ("model", '"llama-70b"', '"llama-8b"'),
    ("model", '"llama-8b"', '"llama-8b"'),
    ("mod\\u0065l", '"llama-70b"', '"llama-8b"'),
    ("stream", "true", "false"),
    ("max_tokens", "100000", "1"),
    ("max_completion_tokens", "100000", "1"),
    ("n", "100", "1"),
    ("stream_options", '{"include_usage": false}', '{"include_usage": true}'),
    ("messages", '[{"role": "user", "content": "a long prompt"}]', "[]"),
    ("prompt", '"a long prompt"', '"a"'),
    ("input", '"a long input"', '"a"'),
]


@pytest.mark.parametrize(("name", "first", "last"), REPEATS)
async def test_a_field_the_proxy_reads_given_twice_is_refused(
    team_proxy: MakeTeamProxy, wandb: Upstream, name: str, first: str, last: str
):
    proxy = await team_proxy()
    status, answer = await post_text(proxy, with_repeat(name, first, last))
    assert status == 400, answer
    field = json.loads(f'"{name}"')
    message = assert_error(answer, "invalid_request_error", field)
    assert f"'{field}' more than once" in message
    assert not wandb.fake.seen


async def test_repeats_elsewhere_are_the_upstreams_business(
    team_proxy: MakeTeamProxy, wandb: Upstream
):
    proxy = await team_proxy()
    text = (
        '{"model": "same-name", "seed": 1, "seed": 2, "messages": '
        '[{"role": "user", "content": "hi", "content": "ho"}], "user": "a", "user": "b"}'
    )
    status, answer = await post_text(proxy, text)
    assert status == 200, answer
    assert wandb.fake.last.body == text.encode()  # forwarded as written


# 3. Headers that pick the provider's account, project or team.

SCOPING = {
    "OpenAI-Project": "acme/other-team",
    "OpenAI-Organization": "org-other",
    "X-Prime-Team-ID": "t-other",
}


def scoping_teams(allowed: str) -> str:
    return f"""
teams:
  research:
    keys: ["{key_hash(RESEARCH_KEY)}"]
    headers: {{wandb: {{OpenAI-Project: acme/research-team}}}}
    client_headers: {allowed}
  ops:
    keys: ["{key_hash(OPS_KEY)}"]
"""


async def call_with(proxy: Proxy, key: str | None, model: str) -> Any:
    headers = {**SCOPING, **({"Authorization": f"Bearer {key}"} if key else {})}
    payload = {"model": model, "messages": MESSAGES}
    url = proxy.url + "/v1/chat/completions"
    async with proxy.http.post(url, json=payload, headers=headers) as resp:
        assert resp.status == 200, await resp.text()


async def test_with_teams_a_client_does_not_choose_the_providers_project(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    # wandb sets OpenAI-Project itself, prime sets X-Prime-Team-ID: the other two are
    # what a client could choose for each; only research may, and not the organization.
    routes = routes_yaml(wandb, prime) + scoping_teams("[OpenAI-Project, x-prime-team-id]")
    proxy = await make_proxy(routes)
    await call_with(proxy, OPS_KEY, "llama-8b")
    seen = wandb.fake.last.headers
    assert seen["OpenAI-Project"] == "acme/research"  # the provider's
    assert "OpenAI-Organization" not in seen and "X-Prime-Team-ID" not in seen
    await call_with(proxy, OPS_KEY, "llama-70b")
    seen = prime.fake.last.headers
    assert seen["X-Prime-Team-ID"] == "team-42"  # the provider's
    assert "OpenAI-Organization" not in seen and "OpenAI-Project" not in seen
    await call_with(proxy, RESEARCH_KEY, "llama-70b")
    seen = prime.fake.last.headers
    assert seen["OpenAI-Project"] == "acme/other-team"  # allowed
    assert seen["X-Prime-Team-ID"] == "team-42"  # allowed, but the provider's wins
    assert "OpenAI-Organization" not in seen
    await call_with(proxy, RESEARCH_KEY, "llama-8b")
    seen = wandb.fake.last.headers
    assert seen["X-Prime-Team-ID"] == "t-other"  # allowed
    assert seen["OpenAI-Project"] == "acme/research-team"  # allowed, but the team's wins
    assert "OpenAI-Organization" not in seen


async def test_without_teams_the_client_headers_pass_as_before(proxy: Proxy, prime: Upstream):
    await call_with(proxy, None, "llama-70b")
    seen = prime.fake.last.headers
    assert seen["OpenAI-Project"] == "acme/other-team"
    assert seen["OpenAI-Organization"] == "org-other"
    assert seen["X-Prime-Team-ID"] == "team-42"  # the provider's


def test_client_headers_names_only_scoping_headers() -> None:
    routes = (
        "providers: {wandb: {base_url: 'http://h'}}\n"
        "models: {m: {targets: [{provider: wandb, model: x}]}}"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(routes + scoping_teams("[OpenAI-Projekt, X-Title]"), {})
    assert caught.value.errors == [
        "teams.research.client_headers[0]: not a provider-scoping header: 'OpenAI-Projekt' "
        "(did you mean 'OpenAI-Project'?)",
        "teams.research.client_headers[1]: not a provider-scoping header: 'X-Title' (known: "
        "OpenAI-Organization, OpenAI-Project, X-Prime-Team-ID)",
    ]


# 4. A client's model id in the log and the metrics.


async def test_a_long_model_id_is_cut_in_the_log_and_never_a_label(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="proxy.access")
    url = proxy.url + "/v1/chat/completions"
    for model in ("x" * 256, "y" * 100_000):
        async with proxy.http.post(url, json={"model": model, "messages": []}) as resp:
            assert resp.status == 404
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxy.access"]
    assert [line["model"] for line in lines] == [
        "x" * 256,
        "y" * 256 + "...[truncated, 100000 chars]",
    ]
    metrics = await scrape(proxy.http, proxy.url)
    assert "xxxx" not in metrics.text and "yyyy" not in metrics.text
    assert metrics.value("llm_proxy_requests_total", model="unknown", status="404") == 2


async def test_the_largest_reservation_passes_limits_that_count_no_tokens(
    team_proxy: MakeTeamProxy, wandb: Upstream
):
    """max_tokens x n near 2**62 reaches the stores (above Lua's exact doubles): limits
    that count requests and slots take it, and each call is settled and booked."""
    proxy = await team_proxy(limits="{requests_per_minute: 10, concurrent: 2}")
    wandb.fake.status = 400  # the fake would otherwise build its 2**31 - 1 choices
    for _ in range(3):
        status, body, _ = await chat(proxy, max_tokens=2**31 - 1, n=2**31 - 1)
        assert status == 400 and b"upstream failure" in body  # the upstream's own answer
    assert len(wandb.fake.seen) == 3
    assert json.loads(wandb.fake.last.body)["n"] == 2**31 - 1
    assert (await ledger(proxy))["totals"]["requests"] == 3
