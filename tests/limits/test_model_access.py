"""A team's ``models``: a model outside them is unknown to the team, on every API and in
/v1/models; and /v1/models leaves out the models no provider has a key for."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from proxy.call.auth import key_hash
from proxy.config.load import ConfigError, parse_config
from tests.conftest import MakeProxy, Proxy
from tests.support import Upstream, routes_yaml

RESEARCH_KEY = "sk-proxy-research-0123456789"
OPS_KEY = "sk-proxy-ops-0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]
# routes_yaml's models are llama-70b, llama-8b and same-name.
FORBIDDEN, UNKNOWN = "llama-70b", "llama-71b"  # the same length: the same Content-Length
PAYLOADS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": MESSAGES},
    "/v1/completions": {"prompt": "hi"},
    "/v1/embeddings": {"input": "hi"},
}


def _teams(models: str = '["llama-8*", same-name]') -> str:
    return f"""
teams:
  research:
    keys: [{{name: laptop, hash: "{key_hash(RESEARCH_KEY)}"}}]
    models: {models}
  ops:
    keys: [{{name: ops, hash: "{key_hash(OPS_KEY)}"}}]
"""


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _post(proxy: Proxy, path: str, model: str, key: str | None) -> tuple[int, Any, bytes]:
    payload = {"model": model, **PAYLOADS[path]}
    async with proxy.http.post(proxy.url + path, json=payload, headers=_auth(key)) as resp:
        return resp.status, resp.headers, await resp.read()


async def _get(proxy: Proxy, path: str, key: str | None) -> tuple[int, Any, bytes]:
    async with proxy.http.get(proxy.url + path, headers=_auth(key)) as resp:
        return resp.status, resp.headers, await resp.read()


async def _listed(proxy: Proxy, key: str | None) -> list[str]:
    async with proxy.http.get(proxy.url + "/v1/models", headers=_auth(key)) as resp:
        assert resp.status == 200, await resp.text()
        return [m["id"] for m in (await resp.json())["data"]]


@pytest.mark.parametrize("path", list(PAYLOADS))
async def test_a_team_calls_only_its_models(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, path: str
):
    proxy = await make_proxy(routes_yaml(wandb, prime) + _teams())
    status, _, body = await _post(proxy, path, FORBIDDEN, RESEARCH_KEY)
    assert status == 404 and b'"code": "model_not_found"' in body
    assert not prime.fake.seen and not wandb.fake.seen  # llama-70b's targets, untouched
    assert (await _post(proxy, path, "llama-8b", RESEARCH_KEY))[0] == 200
    assert (await _post(proxy, path, "same-name", RESEARCH_KEY))[0] == 200
    assert (await _post(proxy, path, FORBIDDEN, OPS_KEY))[0] == 200  # a team without models


@pytest.mark.parametrize("path", [*PAYLOADS, "/v1/models/{}"])
async def test_a_forbidden_model_s_404_is_byte_for_byte_an_unknown_one_s(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, path: str
):
    proxy = await make_proxy(routes_yaml(wandb, prime) + _teams())

    async def ask(model: str) -> tuple[int, Any, bytes]:
        if path.startswith("/v1/models"):
            return await _get(proxy, path.format(model), RESEARCH_KEY)
        return await _post(proxy, path, model, RESEARCH_KEY)

    forbidden, unknown = await ask(FORBIDDEN), await ask(UNKNOWN)
    assert forbidden[0] == unknown[0] == 404
    assert forbidden[2].replace(FORBIDDEN.encode(), UNKNOWN.encode()) == unknown[2]
    assert unknown[2] == (
        b'{"error": {"message": "The model \'llama-71b\' does not exist. Available models: '
        b'llama-8b, same-name.", "type": "invalid_request_error", "param": "model", '
        b'"code": "model_not_found"}}'
    )
    own = {"X-Proxy-Request-Id", "Date"}  # this answer's own
    heads = [
        [(k, v) for k, v in answer[1].items() if k not in own] for answer in (forbidden, unknown)
    ]
    assert heads[0] == heads[1]


async def test_v1_models_needs_a_key_and_lists_the_caller_s_models(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    proxy = await make_proxy(routes_yaml(wandb, prime) + _teams())
    for path in ("/v1/models", "/v1/models/llama-8b"):
        for key in (None, "sk-proxy-wrong"):
            status, _, body = await _get(proxy, path, key)
            assert status == 401 and b'"code": "invalid_api_key"' in body
    assert await _listed(proxy, RESEARCH_KEY) == ["llama-8b", "same-name"]
    assert await _listed(proxy, OPS_KEY) == ["llama-70b", "llama-8b", "same-name"]
    status, _, body = await _get(proxy, "/v1/models/llama-8b", RESEARCH_KEY)
    assert status == 200 and b'"id": "llama-8b"' in body
    assert (await _get(proxy, f"/v1/models/{FORBIDDEN}", OPS_KEY))[0] == 200


async def test_without_teams_v1_models_needs_no_key(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    proxy = await make_proxy(routes_yaml(wandb, prime))
    assert await _listed(proxy, None) == ["llama-70b", "llama-8b", "same-name"]


@pytest.mark.parametrize("teams", [False, True])
async def test_a_model_no_provider_has_a_key_for_is_left_out_of_v1_models(
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    teams: bool,
):
    monkeypatch.delenv("TEST_WANDB_KEY")  # llama-8b and same-name are wandb's alone
    proxy = await make_proxy(routes_yaml(wandb, prime) + (_teams() if teams else ""))
    key = OPS_KEY if teams else None
    # llama-70b keeps its prime target, which has its key.
    assert await _listed(proxy, key) == ["llama-70b"]
    if teams:
        assert await _listed(proxy, RESEARCH_KEY) == []  # its two models cannot answer
    status, _, body = await _get(proxy, "/v1/models/llama-8b", key)
    assert status == 503
    assert body == (
        b'{"error": {"message": "The model \'llama-8b\' cannot answer now: none of its '
        b'providers has its API key (the environment variable TEST_WANDB_KEY is not set).", '
        b'"type": "server_error", "param": null, "code": "provider_unavailable"}}'
    )
    assert (await _post(proxy, "/v1/chat/completions", "llama-8b", key))[0] == 503
    assert (await _get(proxy, "/v1/models/llama-70b", key))[0] == 200


async def test_a_reload_matches_the_patterns_again(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    proxy = await make_proxy(routes_yaml(wandb, prime) + _teams('["llama-*"]'))
    assert await _listed(proxy, RESEARCH_KEY) == ["llama-70b", "llama-8b"]
    new = "  llama-1b:\n    targets:\n      - {provider: wandb, model: tiny}\n"
    proxy.write_config(routes_yaml(wandb, prime, extra=new) + _teams('["llama-*"]'))
    deadline = time.monotonic() + 10
    while "llama-1b" not in await _listed(proxy, RESEARCH_KEY):
        assert time.monotonic() < deadline, "the reload never came"
        await asyncio.sleep(0.05)
    assert (await _post(proxy, "/v1/chat/completions", "llama-1b", RESEARCH_KEY))[0] == 200


MODELS_YAML = """
providers: {p: {base_url: "http://127.0.0.1:9/v1"}}
models:
  llama-8b: {targets: [{provider: p, model: x}]}
  llama-70b: {targets: [{provider: p, model: x}]}
  Qwen/qwen3: {targets: [{provider: p, model: x}]}
"""


def _allowed(models: str) -> set[str]:
    team = f'teams: {{t: {{keys: ["{key_hash(OPS_KEY)}"], models: {models}}}}}\n'
    allowed = parse_config(MODELS_YAML + team, {}).teams["t"].models
    assert allowed is not None
    return set(allowed)


def test_models_are_glob_patterns_with_case_counted():
    assert _allowed('["llama-*"]') == {"llama-8b", "llama-70b"}
    assert _allowed('["llama-?b"]') == {"llama-8b"}
    assert _allowed('["llama-[7]*", "Qwen/*"]') == {"llama-70b", "Qwen/qwen3"}
    assert _allowed('["llama-[!7]*"]') == {"llama-8b"}
    assert _allowed('["*"]') == {"llama-8b", "llama-70b", "Qwen/qwen3"}  # '*' spans a '/'
    assert _allowed('["llama-8b", "llama-8*"]') == {"llama-8b"}
    config = parse_config(MODELS_YAML + f'teams: {{t: {{keys: ["{key_hash(OPS_KEY)}"]}}}}\n', {})
    assert config.teams["t"].models is None  # no models: every model


@pytest.mark.parametrize(
    ("models", "error"),
    [
        ('["llama-[78"]', "teams.t.models[0]: 'llama-[78': the '[' at 6 is never closed by ']'"),
        ('["lama-8b"]', "teams.t.models[0]: 'lama-8b' matches no model (did you mean 'llama-8b'?)"),
        (
            '["qwen/*"]',
            "teams.t.models[0]: 'qwen/*' matches no model (known: Qwen/qwen3, llama-70b, llama-8b)",
        ),
        (
            "[]",
            "teams.t.models: must be a non-empty list of model ids or glob patterns",
        ),
        (
            "llama-*",
            "teams.t.models: must be a non-empty list of model ids or glob patterns, got str",
        ),
        ('["llama-8b", 7]', "teams.t.models[1]: must be a model id or a glob pattern, got 7"),
        ('[""]', "teams.t.models[0]: must be a model id or a glob pattern, got ''"),
    ],
)
def test_a_bad_pattern_is_a_config_error_with_its_path(models: str, error: str):
    with pytest.raises(ConfigError) as caught:
        _allowed(models)
    assert caught.value.errors == [error]


def test_model_limits_name_only_the_team_s_models():
    team = f"""
teams:
  t:
    keys: ["{key_hash(OPS_KEY)}"]
    models: ["llama-*"]
    model_limits: {{Qwen/qwen3: {{requests_per_minute: 1}}, llama-8b: {{concurrent: 1}}}}
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(MODELS_YAML + team, {})
    assert caught.value.errors == ["teams.t.model_limits.Qwen/qwen3: not one of teams.t.models"]
