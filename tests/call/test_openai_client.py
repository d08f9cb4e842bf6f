"""The official openai client, pointed at the proxy, works as it does against a provider."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Proxy
from tests.support import Upstream
from tests.support.fake_upstream import REPLY

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key="team-key", max_retries=0
    ) as client:
        yield client


async def test_chat(client: openai.AsyncOpenAI, prime: Upstream):
    response = await client.chat.completions.create(model="llama-70b", messages=MESSAGES)
    assert response.choices[0].message.content == REPLY
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None and response.usage.completion_tokens == 6
    assert prime.fake.last.headers["X-Prime-Team-ID"] == "team-42"


async def test_stream_iterated_as_in_the_prime_docs(client: openai.AsyncOpenAI):
    stream = await client.chat.completions.create(model="llama-70b", messages=MESSAGES, stream=True)
    text = ""
    finish = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content is not None:
            text += chunk.choices[0].delta.content
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert text == REPLY
    assert finish == "stop"


async def test_models_list(client: openai.AsyncOpenAI):
    ids = [model.id async for model in client.models.list()]
    assert ids == ["llama-70b", "llama-8b", "same-name"]
    model = await client.models.retrieve("llama-8b")
    assert model.owned_by == "system"


async def test_completions_and_embeddings(client: openai.AsyncOpenAI):
    completion = await client.completions.create(model="llama-8b", prompt="Say", max_tokens=3)
    assert completion.choices[0].text == "The capital of"
    assert completion.choices[0].finish_reason == "length"
    embedding = await client.embeddings.create(model="llama-8b", input="hello")
    assert embedding.data[0].embedding == [0.25, -0.5, 1.0]


async def test_errors_arrive_as_sdk_exceptions(
    client: openai.AsyncOpenAI, wandb: Upstream, prime: Upstream
):
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="nope", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="llama-8b", messages="hi")  # type: ignore[arg-type]
    assert bad.value.param == "messages"

    prime.fake.status = wandb.fake.status = 429
    prime.fake.error_body = wandb.fake.error_body = {
        "error": {
            "message": "Rate limit exceeded",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
        }
    }
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="llama-70b", messages=MESSAGES)
    assert limited.value.code == "rate_limit_exceeded"

    wandb.fake.status = 200
    wandb.fake.pause_before_headers = 10
    with pytest.raises(openai.APIStatusError) as timed_out:
        await client.chat.completions.create(model="llama-8b", messages=MESSAGES)
    assert timed_out.value.status_code == 504
