"""Output caps (``models.ID.max_tokens: {default, limit, field}``): the default added to a
call that names no cap, byte for byte otherwise; a 400 above the limit that reaches no
upstream; the reservation taken from the model's default; config errors; reloads."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.call.body import parse_body
from proxy.config.load import ConfigError, parse_config
from proxy.limits.usage import estimate_prompt
from proxy.services import SERVICES
from tests.conftest import MakeProxy, Proxy
from tests.support import ProxyProcess, Upstream, eventually, free_port, routes_yaml
from tests.support.strategies import SPACES, json_values
from tests.support.teams import MESSAGES, RESEARCH_KEY, team_yaml

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
# Each upstream id is the public one, so that a body the proxy leaves alone reaches the
# upstream as the client's exact bytes (no model rewrite either).
CAPPED = """
  capped:
    max_tokens: {default: 3, limit: 100}
    targets: [{provider: wandb, model: capped}]
  capped-new-name:
    max_tokens: {default: 4, limit: 100, field: max_completion_tokens}
    targets: [{provider: wandb, model: capped-new-name}]
  limit-only:
    max_tokens: {limit: 5}
    targets: [{provider: wandb, model: limit-only}]
  default-only:
    max_tokens: {default: 2}
    targets: [{provider: wandb, model: default-only}]
"""


@pytest.fixture
async def proxy(make_proxy: MakeProxy, wandb: Upstream, prime: Upstream) -> Proxy:
    return await make_proxy(routes_yaml(wandb, prime, extra=CAPPED))


async def post(proxy: Proxy | ProxyProcess, path: str, text: str, key: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url + path, data=text.encode(), headers=headers) as resp,
    ):
        return resp.status, await resp.read(), resp.headers


def added(text: str, member: str) -> bytes:
    """``text`` with ``member`` appended as the proxy appends it: just before the
    object's closing brace, after a comma, every other byte as it was."""
    close = text.rindex("}")
    return (text[:close] + "," + member + text[close:]).encode()


# 1. The default, added when the client names no cap.

ODD = (
    '{"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],\n'
    '  "model" :"capped", "messages":[{"role":"user","content":"h\\u00e9 \u00e9"}],'
    ' "seed": 123456789012345678901234567890, "temperature": 0.70 , "x": {"max_tokens": 9}\n}  '
)


async def test_the_default_is_added_and_every_other_byte_kept(proxy: Proxy, wandb: Upstream):
    status, body, _ = await post(proxy, CHAT, ODD)
    assert status == 200, body
    assert wandb.fake.last.body == added(ODD, '"max_tokens":3')
    answer = json.loads(body)
    assert answer["choices"][0]["finish_reason"] == "length"  # the upstream honoured it
    assert answer["usage"]["completion_tokens"] == 3


async def test_a_streamed_call_gets_the_default_and_the_usage_option(proxy: Proxy, wandb: Upstream):
    text = ODD.replace('"messages"', '"stream": true, "messages"')
    status, body, _ = await post(proxy, CHAT, text)
    assert status == 200, body
    assert wandb.fake.last.body == added(
        text, '"max_tokens":3,"stream_options":{"include_usage":true}'
    )
    assert body.count(b'"content": " ') == 2  # three words: the first has no space
    assert b'"finish_reason": "length"' in body


async def test_a_null_cap_is_replaced_where_it_stands(proxy: Proxy, wandb: Upstream):
    text = (
        '{"model": "capped", "max_tokens" :  null , "messages": [], "max_completion_tokens":null}'
    )
    status, body, _ = await post(proxy, CHAT, text)
    assert status == 200, body
    assert wandb.fake.last.body == text.replace("null ,", "3 ,").encode()


async def test_the_field_name_is_the_models_in_chat_and_max_tokens_in_completions(
    proxy: Proxy, wandb: Upstream
):
    chat = '{"model": "capped-new-name", "messages": []}'
    assert (await post(proxy, CHAT, chat))[0] == 200
    assert wandb.fake.last.body == added(chat, '"max_completion_tokens":4')
    # The legacy completions API has no max_completion_tokens.
    completion = '{"model": "capped-new-name", "prompt": "Say"}'
    assert (await post(proxy, COMPLETIONS, completion))[0] == 200
    assert wandb.fake.last.body == added(completion, '"max_tokens":4')


async def test_a_limit_alone_is_the_default_and_a_default_alone_limits_nothing(
    proxy: Proxy, wandb: Upstream
):
    text = '{"model": "limit-only", "messages": []}'
    assert (await post(proxy, CHAT, text))[0] == 200
    assert wandb.fake.last.body == added(text, '"max_tokens":5')
    text = '{"model": "default-only", "messages": []}'
    assert (await post(proxy, CHAT, text))[0] == 200
    assert wandb.fake.last.body == added(text, '"max_tokens":2')
    text = '{"model": "default-only", "messages": [], "max_tokens": 1000000}'
    assert (await post(proxy, CHAT, text))[0] == 200
    assert wandb.fake.last.body == text.encode()


async def test_embeddings_and_uncapped_models_are_left_alone(proxy: Proxy, wandb: Upstream):
    for path, text in [
        ("/v1/embeddings", '{"model": "capped", "input": "x"}'),
        (CHAT, '{"model": "same-name", "messages": []}'),
        (COMPLETIONS, '{"model": "same-name", "prompt": "x"}'),
    ]:
        status, body, _ = await post(proxy, path, text)
        assert status == 200, body
        assert wandb.fake.last.body == text.encode()


# 2. A cap the client names: passed as sent up to the limit, refused above it.

WITHIN = [
    '{"model": "capped", "messages": [], "max_tokens": 100}',
    '{"model": "capped", "messages": [], "max_completion_tokens": 1}',
    '{"model": "capped", "messages": [], "max_tokens": 100, "max_completion_tokens": 7}',
    '{"model": "capped", "messages": [], "max_tokens": null, "max_completion_tokens": 7}',
    '{"model": "capped", "messages": [], "max_tokens": 0}',  # the upstream's to refuse
    '{"model": "capped", "stream": true, "stream_options": {"include_usage": true},'
    ' "messages": [], "max_tokens": 100}',
]


@pytest.mark.parametrize("text", WITHIN)
async def test_a_cap_within_the_limit_is_passed_as_sent(proxy: Proxy, wandb: Upstream, text: str):
    status, body, _ = await post(proxy, CHAT, text)
    assert status == 200, body
    assert wandb.fake.last.body == text.encode()


ABOVE = [
    (CHAT, {"max_tokens": 101}, "max_tokens"),
    (CHAT, {"max_completion_tokens": 101}, "max_completion_tokens"),
    (CHAT, {"max_tokens": 5, "max_completion_tokens": 101}, "max_completion_tokens"),
    (CHAT, {"max_tokens": 101, "max_completion_tokens": 5}, "max_tokens"),
    (CHAT, {"max_tokens": 2**31 - 1, "stream": True}, "max_tokens"),
    (COMPLETIONS, {"max_tokens": 101}, "max_tokens"),
    (COMPLETIONS, {"max_completion_tokens": 101}, "max_completion_tokens"),
]


@pytest.mark.parametrize(("path", "fields", "param"), ABOVE)
async def test_a_cap_above_the_limit_is_refused_and_reaches_no_upstream(
    proxy: Proxy, wandb: Upstream, path: str, fields: dict[str, Any], param: str
):
    required = {"messages": MESSAGES} if path == CHAT else {"prompt": "Say"}
    status, body, _ = await post(proxy, path, json.dumps({"model": "capped", **required, **fields}))
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error == {
        "message": f"{param} is too large: {fields[param]}. The model 'capped' allows at most "
        f"100 completion tokens; lower {param}.",
        "type": "invalid_request_error",
        "param": param,
        "code": None,
    }
    assert not wandb.fake.seen


# 3. The reservation: the model's default, not accounting.default_max_tokens (50 in
# team_yaml), on the limiter backends where it matters.

RESERVED = """
  big-default:
    max_tokens: {default: 300, limit: 1000}
    targets: [{provider: wandb, model: big-default}]
  small-default:
    max_tokens: {default: 20, limit: 1000}
    targets: [{provider: wandb, model: small-default}]
  small-limit:
    max_tokens: {limit: 100}
    targets: [{provider: wandb, model: small-limit}]
"""
TOKENS_PER_MINUTE = 250
PROMPT = estimate_prompt({"messages": MESSAGES})


async def team_chat(proxy: Proxy, model: str, **fields: Any) -> tuple[int, Any, Any]:
    text = json.dumps({"model": model, "messages": MESSAGES, **fields})
    status, body, headers = await post(proxy, CHAT, text, key=RESEARCH_KEY)
    return status, body, headers


@pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
@pytest.mark.parametrize("stream", [False, True])
async def test_the_reservation_is_the_models_default(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, backend: str, stream: bool
):
    routes = routes_yaml(wandb, prime, extra=RESERVED)
    limits = f"{{tokens_per_minute: {TOKENS_PER_MINUTE}}}"
    proxy = await make_proxy(routes + team_yaml(redis_url=backend, limits=limits))
    # 14 + 300 is more than 250, where 14 + accounting's 50 would fit.
    status, body, _ = await team_chat(proxy, "big-default", stream=stream)
    assert status == 429, body
    error = json.loads(body)["error"]
    assert error["param"] == "tokens_per_minute" and "Lower max_tokens" in error["message"]
    # A cap of 0 or less is the upstream's to refuse, and reserves the model's default.
    for nothing in (0, -1):
        status, body, _ = await team_chat(proxy, "big-default", stream=stream, max_tokens=nothing)
        assert status == 429, body
    assert not wandb.fake.seen
    # 14 + 20 fits, and takes 20 for the answer, not accounting's 50.
    status, body, headers = await team_chat(proxy, "small-default", stream=stream)
    assert status == 200, body
    remaining = int(headers["x-ratelimit-remaining-tokens"])
    assert TOKENS_PER_MINUTE - PROMPT - 20 <= remaining < TOKENS_PER_MINUTE - PROMPT - 20 + 5
    assert json.loads(wandb.fake.last.body)["max_tokens"] == 20
    # n multiplies it: 3 x 100 (a limit alone is the default) cannot fit, 2 x 100 can.
    status, _, _ = await team_chat(proxy, "small-limit", stream=stream, n=3)
    assert status == 429
    status, body, _ = await team_chat(proxy, "small-limit", stream=stream, n=2)
    assert status == 200, body
    assert proxy.app[SERVICES].accountant.redis_errors == 0


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_a_null_cap_leaves_the_reservation_to_the_other_name(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, backend: str
):
    routes = routes_yaml(wandb, prime, extra=RESERVED)
    limits = f"{{tokens_per_minute: {TOKENS_PER_MINUTE}}}"
    proxy = await make_proxy(routes + team_yaml(redis_url=backend, limits=limits))
    # max_tokens is the cap the upstream gets: 14 + 100 is reserved, not 14 + 300.
    fields = {"max_completion_tokens": None, "max_tokens": 100}
    status, body, headers = await team_chat(proxy, "big-default", **fields)
    assert status == 200, body
    remaining = int(headers["x-ratelimit-remaining-tokens"])
    assert TOKENS_PER_MINUTE - PROMPT - 100 <= remaining < TOKENS_PER_MINUTE - PROMPT - 100 + 5


# 4. routes.yaml: what a cap may be, and a reload that changes it.

CONFIG = """
providers: {{p: {{base_url: "http://127.0.0.1:9/v1"}}}}
models:
  m:
    max_tokens: {cap}
    targets: [{{provider: p, model: m}}]
"""


@pytest.mark.parametrize(
    ("cap", "default", "limit", "field"),
    [
        ("{default: 10, limit: 10}", 10, 10, "max_tokens"),
        ("{limit: 10}", 10, 10, "max_tokens"),
        ("{default: 10}", 10, None, "max_tokens"),
        ("{default: 1, field: max_completion_tokens}", 1, None, "max_completion_tokens"),
        ("{limit: 2147483647}", 2**31 - 1, 2**31 - 1, "max_tokens"),
    ],
)
def test_caps_that_are_valid(cap: str, default: int, limit: int | None, field: str) -> None:
    model = parse_config(CONFIG.format(cap=cap), {}).models["m"]
    assert model.max_tokens is not None
    assert (model.max_tokens.default, model.max_tokens.limit) == (default, limit)
    assert model.max_tokens.field == field


def test_a_model_without_a_cap_has_none() -> None:
    text = CONFIG.replace("    max_tokens: {cap}\n", "").format()
    assert parse_config(text, {}).models["m"].max_tokens is None


@pytest.mark.parametrize(
    ("cap", "error"),
    [
        ("{default: 11, limit: 10}", "models.m.max_tokens.default: 11 is above the limit, 10"),
        ("{}", "models.m.max_tokens: needs a default, a limit or both"),
        ("{field: max_tokens}", "models.m.max_tokens: needs a default, a limit or both"),
        ("100", "models.m.max_tokens: must be a mapping, got int"),
        ("{limit: 0}", "models.m.max_tokens.limit: must be a whole number of at least 1, got 0"),
        ("{default: -1}", "models.m.max_tokens.default: must be a whole number of at least 1"),
        ("{default: 1.5}", "models.m.max_tokens.default: must be a whole number of at least 1"),
        ("{default: '10'}", "models.m.max_tokens.default: must be a whole number of at least 1"),
        ("{limit: true}", "models.m.max_tokens.limit: must be a whole number of at least 1"),
        ("{limit: 2147483648}", "models.m.max_tokens.limit: must be at most 2147483647"),
        ("{default: 1, field: max_token}", "models.m.max_tokens.field: unknown field 'max_token'"),
        ("{default: 1, lmit: 2}", "models.m.max_tokens.lmit: unknown key (did you mean 'limit'?)"),
    ],
)
def test_caps_that_are_config_errors(cap: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(CONFIG.format(cap=cap), {})
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors
    assert len(caught.value.errors) == 1, caught.value.errors


async def test_a_served_process_applies_the_caps_and_a_reload_changes_them(
    tmp_path, wandb: Upstream, prime: Upstream
):
    """``python -m proxy serve`` as a child: the default added (plain and streamed), a
    refusal above the limit; then routes.yaml changes both, and the next calls obey."""
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime, extra=CAPPED))
    process = ProxyProcess(path, free_port())
    text = '{"model":"capped","messages":[]}'
    try:
        await process.wait_listening()
        assert (await post(process, CHAT, text))[0] == 200
        assert wandb.fake.last.body == added(text, '"max_tokens":3')
        streamed = text[:-1] + ',"stream":true}'
        assert (await post(process, CHAT, streamed))[0] == 200
        assert wandb.fake.last.body == added(
            streamed, '"max_tokens":3,"stream_options":{"include_usage":true}'
        )
        over = text[:-1] + ',"max_tokens":101}'
        assert (await post(process, CHAT, over))[0] == 400
        seen = len(wandb.fake.seen)
        new_caps = CAPPED.replace("{default: 3, limit: 100}", "{default: 7, limit: 200}")
        path.write_text(routes_yaml(wandb, prime, extra=new_caps))
        await eventually(lambda: "config reloaded" in process.log(), 10)
        assert (await post(process, CHAT, over))[0] == 200
        assert wandb.fake.last.body == over.encode()
        assert (await post(process, CHAT, text))[0] == 200
        assert wandb.fake.last.body == added(text, '"max_tokens":7')
        assert len(wandb.fake.seen) == seen + 2
    finally:
        assert process.stop() == 0


# 5. The splice itself, against json's own reading of the result.

KEY_NAMES = ["model", "messages", "max_tokens", "stream_options", "tools", "x"]
KEYS = st.sampled_from(KEY_NAMES)
VALUES = json_values(KEY_NAMES)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(KEYS, VALUES, max_size=5),
    space=SPACES,
    usage=st.booleans(),
    name=st.sampled_from(["max_tokens", "max_completion_tokens"]),
    null=st.booleans(),
)
def test_an_added_field_changes_that_member_only(
    fields: dict[str, Any], space: str, usage: bool, name: str, null: bool
):
    fields = {k: v for k, v in fields.items() if k != name}
    if null:
        fields[name] = None
    raw = json.dumps({**fields, "model": "client-name"}, indent=space or None)
    body = parse_body(raw.encode()).with_field(name, 42)
    assert body.fields == {**json.loads(raw), name: 42}
    sent = body.rewritten("upstream-name", include_usage=usage)
    expected = {**json.loads(raw), "model": "upstream-name", name: 42}
    if usage:
        options = expected.get("stream_options")
        expected["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    assert json.loads(sent) == expected
    # Nothing else to change: the client's bytes, the null replaced or the member added.
    alone = body.rewritten("client-name")
    if null:  # in place: json.dumps writes 42 where it wrote null, nested ones left alone
        in_place = {**fields, "model": "client-name"}
        in_place[name] = 42
        assert alone == json.dumps(in_place, indent=space or None).encode()
    else:
        assert alone == added(raw, f'"{name}":42')


def test_a_field_added_to_an_empty_object_needs_no_comma():
    body = parse_body(b" { } ").with_field("max_tokens", 1)
    assert body.rewritten("m") == b' { "max_tokens":1,"model":"m"} '


def test_a_null_cap_whose_name_is_written_with_an_escape_is_still_replaced():
    body = parse_body(b'{"model": "m", "max_\\u0074okens": null, "x": {"max_tokens": null}}')
    assert body.with_field("max_tokens", 3).rewritten("m") == (
        b'{"model": "m", "max_\\u0074okens": 3, "x": {"max_tokens": null}}'
    )
