"""Calls reach the right upstream with the body untouched but for ``model``."""

from __future__ import annotations

import json

from tests.conftest import PRIME_KEY, WANDB_KEY, MakeProxy, Proxy, StartApp
from tests.support import Upstream, routes_yaml
from tests.support.fake_upstream import FakeUpstream

CHAT = "/v1/chat/completions"


async def test_body_reaches_upstream_byte_for_byte_except_model(proxy: Proxy, wandb: Upstream):
    # Unknown fields, key order, odd whitespace, big integers and float spellings
    # must all survive: the proxy splices the model and leaves the rest alone.
    sent = (
        '{"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],\n'
        '  "model" :"llama-8b", "messages":[{"role":"user","content":"h\\u00e9 \u00e9"}],'
        ' "logit_bias": {"50256": -100}, "seed": 123456789012345678901234567890,'
        ' "temperature": 0.70, "n": 2, "stop": ["\\n"], "response_format": {"type": "json_object"}}'
    )
    async with proxy.http.post(proxy.url + CHAT, data=sent.encode()) as resp:
        assert resp.status == 200
        reply = await resp.json()
    expected = sent.replace('"llama-8b"', '"meta-llama/Llama-3.1-8B-Instruct"').encode()
    assert wandb.fake.last.body == expected
    assert len(reply["choices"]) == 2


async def test_unchanged_model_name_sends_the_clients_bytes(proxy: Proxy, wandb: Upstream):
    sent = b'{"model":"same-name","messages":[{"role":"user","content":"x"}],"top_p":1.0}'
    async with proxy.http.post(proxy.url + CHAT, data=sent) as resp:
        assert resp.status == 200
    assert wandb.fake.last.body == sent


async def test_wandb_gets_its_path_key_and_project_header(proxy: Proxy, wandb: Upstream):
    payload = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": "Bearer client-key-for-the-proxy"}
    async with proxy.http.post(proxy.url + CHAT, json=payload, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    seen = wandb.fake.last
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {WANDB_KEY}"
    assert seen.headers["OpenAI-Project"] == "acme/research"
    assert "client-key-for-the-proxy" not in json.dumps(dict(seen.headers))


async def test_prime_gets_api_v1_path_and_team_header(proxy: Proxy, prime: Upstream):
    payload = {"model": "llama-70b", "messages": [{"role": "user", "content": "hi"}]}
    async with proxy.http.post(proxy.url + CHAT, json=payload) as resp:
        assert resp.status == 200
    seen = prime.fake.last
    assert seen.path == "/api/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {PRIME_KEY}"
    assert seen.headers["X-Prime-Team-ID"] == "team-42"
    assert seen.json()["model"] == "meta-llama/llama-3.1-70b-instruct"


async def test_hop_by_hop_headers_dropped_both_ways(proxy: Proxy, wandb: Upstream):
    wandb.fake.extra_headers = {
        "X-Upstream-Note": "kept",
        "Keep-Alive": "timeout=5",
        "X-Private": "listed",
        "X-Also-Private": "listed",
        "Connection": "X-Private,X-Also-Private",  # a list needs no space after its commas
    }
    headers = {
        "Connection": "keep-alive,X-Secret-Hop , X-Other-Hop",
        "X-Secret-Hop": "1",
        "X-Other-Hop": "1",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "X-Client-Note": "kept",
        "Upgrade": "h2c",
    }
    payload = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}
    async with proxy.http.post(proxy.url + CHAT, json=payload, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Upstream-Note"] == "kept"
        assert "Keep-Alive" not in resp.headers
        assert "X-Private" not in resp.headers and "X-Also-Private" not in resp.headers
    seen = wandb.fake.last.headers
    assert seen["X-Client-Note"] == "kept"
    for name in ("X-Secret-Hop", "X-Other-Hop", "TE", "Proxy-Authorization", "Upgrade"):
        assert name not in seen, name


async def test_completions_and_embeddings_route_by_model(proxy: Proxy, wandb: Upstream):
    async with proxy.http.post(
        proxy.url + "/v1/completions", json={"model": "llama-8b", "prompt": "Say hi", "n": 1}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["object"] == "text_completion"
    assert wandb.fake.last.path == "/v1/completions"
    async with proxy.http.post(
        proxy.url + "/v1/embeddings", json={"model": "llama-8b", "input": ["a", "b"]}
    ) as resp:
        assert resp.status == 200
        assert len((await resp.json())["data"]) == 2
    assert wandb.fake.last.path == "/v1/embeddings"
    assert wandb.fake.last.json()["model"] == "meta-llama/Llama-3.1-8B-Instruct"


async def test_finish_reason_length_relayed(proxy: Proxy):
    payload = {
        "model": "llama-8b",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    }
    async with proxy.http.post(proxy.url + CHAT, json=payload) as resp:
        body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


async def test_models_list_in_wandb_format(proxy: Proxy):
    async with proxy.http.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["llama-70b", "llama-8b", "same-name"]
    assert body["data"][0] == {
        "id": "llama-70b",
        "object": "model",
        "created": 0,
        "owned_by": "system",
        "root": "llama-70b",
    }
    assert "prime" not in json.dumps(body) and "Llama-3.1" not in json.dumps(body)


async def test_client_credentials_never_reach_the_upstream(proxy: Proxy, wandb: Upstream):
    # Azure-style and Anthropic-style keys and cookies are the client's credentials for
    # the proxy: the upstream sees only the provider's key.
    headers = {
        "api-key": "client-azure-key",
        "x-api-key": "client-anthropic-key",
        "Cookie": "session=client-cookie",
        "X-Client-Note": "kept",
    }
    for stream in (False, True):
        payload = {
            "model": "llama-8b",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream,
        }
        async with proxy.http.post(proxy.url + CHAT, json=payload, headers=headers) as resp:
            assert resp.status == 200
            await resp.read()
        seen = wandb.fake.last.headers
        assert seen["X-Client-Note"] == "kept"  # the check below can see client headers
        for name in ("api-key", "x-api-key", "Cookie"):
            assert name not in seen, name
        assert "client-" not in repr(sorted(seen.items()))


async def test_upstream_rate_limit_headers_are_withheld(proxy: Proxy, wandb: Upstream):
    # The upstream's x-ratelimit-* describe the proxy's provider account, not the client.
    wandb.fake.extra_headers = {
        "x-ratelimit-remaining-requests": "7",
        "X-RateLimit-Limit-Tokens": "90000",
        "x-ratelimit-reset-requests": "6m0s",
        "X-Upstream-Note": "kept",
    }
    for stream in (False, True):
        payload = {
            "model": "llama-8b",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream,
        }
        async with proxy.http.post(proxy.url + CHAT, json=payload) as resp:
            assert resp.status == 200
            await resp.read()
            assert resp.headers["X-Upstream-Note"] == "kept"
            leaked = [name for name in resp.headers if name.lower().startswith("x-ratelimit-")]
            assert leaked == [], (stream, leaked)


async def test_identity_encoding_is_asked_whatever_the_client_accepts(
    proxy: Proxy, wandb: Upstream
):
    headers = {"Accept-Encoding": "gzip, br, zstd"}
    payload = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}
    async with proxy.http.post(proxy.url + CHAT, json=payload, headers=headers) as resp:
        assert resp.status == 200
    assert wandb.fake.last.headers.getall("Accept-Encoding") == ["identity"]


async def test_the_upstream_is_told_the_body_is_json_whatever_the_client_said(
    proxy: Proxy, wandb: Upstream
):
    body = json.dumps({"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]})
    for client_says in ("text/plain", None):
        headers = {"Content-Type": client_says} if client_says else {}
        async with proxy.http.post(proxy.url + CHAT, data=body.encode(), headers=headers) as resp:
            assert resp.status == 200
        assert wandb.fake.last.headers.getall("Content-Type") == ["application/json"]


async def test_redirects_are_relayed_never_followed(
    make_proxy: MakeProxy, start_app: StartApp, wandb: Upstream, prime: Upstream
):
    # The upstream points elsewhere; the proxy only ever calls the URL in routes.yaml.
    elsewhere = FakeUpstream(key=None, name="elsewhere")
    elsewhere_url = await start_app(elsewhere.app())
    proxy = await make_proxy(routes_yaml(wandb, prime))
    for status in (301, 302, 307, 308):
        wandb.fake.status = status
        wandb.fake.error_headers = {"Location": elsewhere_url + CHAT}
        payload = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}
        async with proxy.http.post(proxy.url + CHAT, json=payload, allow_redirects=False) as resp:
            assert resp.status == status
            assert resp.headers["Location"] == elsewhere_url + CHAT
    assert len(wandb.fake.seen) == 4
    assert elsewhere.seen == []


async def test_the_headers_the_proxy_writes_have_their_canonical_case(
    proxy: Proxy, wandb: Upstream
):
    # Header names are case-insensitive, but not to every upstream or log pipeline that
    # greps them: the proxy's own headers are written as the providers' docs spell them.
    payload = json.dumps({"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]})
    # Without the client's own Accept-Encoding and Content-Type, whose names (and case)
    # the proxy would keep while it replaces their values.
    skipped = ["Accept-Encoding", "Content-Type"]
    async with proxy.http.post(
        proxy.url + CHAT, data=payload.encode(), skip_auto_headers=skipped
    ) as resp:
        assert resp.status == 200
        to_client = [name for name, _ in resp.raw_headers]
    assert b"X-Proxy-Request-Id" in to_client
    to_upstream = wandb.fake.last.raw_names
    for name in (b"Authorization", b"Accept-Encoding", b"Content-Type"):
        assert name in to_upstream, to_upstream
