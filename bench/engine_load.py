"""The two workloads of ``python3 -m bench engines``, sent through the proxy as a client
would: streamed chat calls, each timed to its first content token.

A: multi-turn. Conversations over a few long system prompts (about 1,500 tokens each),
started at a steady pace; each conversation sends its turns one after the other, each
turn the whole history so far plus a new question, the engine's own answers included.
B: no shared prefixes. Single calls, each with a prompt of its own, at a steady pace.
The texts are drawn from a seeded generator, so every strategy gets the same calls.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

WORDS = tuple(
    " ".join(
        (
            "river stone market winter lantern signal orchard copper harbor meadow engine",
            "ledger thunder violet canyon whisper garden compass beacon timber silver",
            "railway glacier spindle marble feather voyage citadel ember prairie quarry",
            "saddle tundra willow anchor basalt cobalt dune falcon grove helm island",
        )
    ).split(" ")
)


@dataclass(frozen=True)
class Workload:
    name: str
    conversations: int  # how many, started ``stagger`` seconds apart
    turns: int  # calls per conversation, one after the other
    stagger: float
    system_words: int  # 0: no system prompt
    systems: int  # distinct system prompts, shared round the conversations
    question_words: int
    max_tokens: int = 16


@dataclass
class Tally:
    """What the calls of one run measured."""

    ttft: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few failures' answers


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def one_model(system: int) -> str:
    """Every conversation asks for the one model, whatever its system prompt."""
    return "smollm2"


async def run(
    url: str, load: Workload, model_of: Callable[[int], str] = one_model, seed: int = 7
) -> Tally:
    """Every conversation of ``load`` against the proxy at ``url``; the tally of all.
    ``model_of``: the model a conversation asks for, from its system prompt's number."""
    systems = _systems(load, seed)
    tally = Tally()
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        tasks = [
            _conversation(
                _Client(http, url, model_of(n % max(1, load.systems))),
                load,
                n,
                systems,
                random.Random(seed * 1000 + n),
                tally,
            )
            for n in range(load.conversations)
        ]
        await asyncio.gather(*(_after(n * load.stagger, task) for n, task in enumerate(tasks)))
    tally.seconds = time.monotonic() - started
    return tally


def _systems(load: Workload, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}: " + text(rng, load.system_words) for i in range(load.systems)]


async def warm(engines: list[str], load: Workload, seed: int = 7) -> None:
    """Send every system prompt of ``load`` once to each engine (its root URL), straight
    to it: afterwards each replica holds every prompt in its cache, as if a perfect
    placement had nothing left to save on them."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def one(url: str) -> None:
            for system in _systems(load, seed):
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": "Hi."},
                ]
                body = {"messages": messages, "max_tokens": 1, "temperature": 0}
                async with http.post(url + "/v1/chat/completions", json=body) as resp:
                    resp.raise_for_status()
                    await resp.read()

        await asyncio.gather(*(one(url) for url in engines))


async def _after(delay: float, task: object) -> None:
    await asyncio.sleep(delay)
    await task  # type: ignore[misc]


@dataclass(frozen=True)
class _Client:
    """Where a conversation's calls go, and for which model."""

    http: aiohttp.ClientSession
    url: str
    model: str


async def _conversation(
    client: _Client,
    load: Workload,
    n: int,
    systems: list[str],
    rng: random.Random,
    tally: Tally,
) -> None:
    history: list[dict[str, str]] = []
    if load.system_words:
        history.append({"role": "system", "content": systems[n % len(systems)]})
    for turn in range(load.turns):
        question = f"Conversation {n}, question {turn}: " + text(rng, load.question_words)
        history.append({"role": "user", "content": question})
        answer = await _call(client, history, load.max_tokens, tally)
        history.append({"role": "assistant", "content": answer or "I do not know."})


async def _call(
    client: _Client,
    messages: list[dict[str, str]],
    max_tokens: int,
    tally: Tally,
) -> str | None:
    body = {
        "model": client.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, parts = time.monotonic(), None, []
    async with client.http.post(client.url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            tally.failed += 1
            answer = (await resp.read())[:300].decode(errors="replace")
            if len(tally.errors) < 3:
                tally.errors.append(f"{resp.status}: {answer}")
            return None
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    first = first or time.monotonic()
                    parts.append(delta)
            usage = chunk.get("usage")
            if usage:
                tally.prompt_tokens += usage.get("prompt_tokens", 0)
                tally.completion_tokens += usage.get("completion_tokens", 0)
    tally.ttft.append((first or time.monotonic()) - sent)
    return "".join(parts)
