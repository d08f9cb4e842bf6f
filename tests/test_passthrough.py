"""Calls reach the right upstream with the body untouched but for ``model``."""

from __future__ import annotations

import json

from tests.conftest import PRIME_KEY, WANDB_KEY, Proxy
from tests.support import Upstream

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
        "Connection": "X-Private",
    }
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
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
        assert "X-Private" not in resp.headers
    seen = wandb.fake.last.headers
    assert seen["X-Client-Note"] == "kept"
    for name in ("X-Secret-Hop", "TE", "Proxy-Authorization", "Upgrade"):
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
