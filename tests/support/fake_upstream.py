"""A fake OpenAI-compatible provider: a real aiohttp app on a real port.

One class plays each seed provider: W&B (``/v1``, ``OpenAI-Project``), Prime
(``/api/v1``, ``X-Prime-Team-ID``) and the generic chat API (finish reasons ``stop``
and ``length``, ``n``, usage). Tests steer it through its attributes and read what
it saw in ``seen``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

REPLY = "The capital of France is Paris."


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    # The header names as they came on the wire: aiohttp's parser gives well-known
    # names (Accept-Encoding…) their canonical case in ``headers``.
    raw_names: tuple[bytes, ...] = ()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Fault:
    """One request's misbehaviour, consumed in order from ``FakeUpstream.faults``."""

    status: int = 0  # answer this status with an OpenAI-shaped error
    retry_after: str | None = None
    hang: bool = False  # never send headers
    first_token_delay: float = 0.0  # stream: headers at once, first bytes later
    reset_after_first: bool = False  # stream: send one event, then reset the connection
    malformed_json: bool = False  # 200 application/json that does not parse
    invalid_sse: bool = False  # 200 text/event-stream whose body is not SSE
    body: bytes | None = None  # answer ``status`` (200 if 0) with these bytes as JSON


OK = Fault()


@dataclass
class FakeUpstream:
    prefix: str = "/v1"
    key: str | None = "upstream-key"  # None: a local engine that wants no key
    name: str = "fake"
    seen: list[Seen] = field(default_factory=list)
    # Steering: an error status (with body and headers), a hang before answering,
    # or an exact stream script of byte chunks and float pauses.
    status: int = 200
    error_body: dict[str, Any] | None = None
    error_headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    pause_before_headers: float = 0.0
    stream_script: Sequence[bytes | float | asyncio.Event] | None = None
    cut_stream_after: int | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    chunk_pause: float = 0.0
    # When the proxy closed a connection on us (monotonic clock).
    cancelled_at: list[float] = field(default_factory=list)
    # Per-request faults, first one first; when empty, the attributes above rule.
    faults: list[Fault] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    in_flight: int = 0
    # Every usage object this upstream sent, for checking the ledger against.
    reported: list[dict[str, int]] = field(default_factory=list)
    send_usage: bool = True
    # Set: every request waits for it before it is answered (calls held in flight).
    hold: asyncio.Event | None = None

    def app(self) -> web.Application:
        app = web.Application()
        for endpoint in ("chat/completions", "completions", "embeddings"):
            app.router.add_post(f"{self.prefix}/{endpoint}", self.handle)
        app.router.add_get(f"{self.prefix}/models", self.models)
        return app

    @property
    def last(self) -> Seen:
        return self.seen[-1]

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.arrivals.append(time.monotonic())
        raw_names = tuple(name for name, _ in request.raw_headers)
        headers = CIMultiDict(request.headers)
        self.seen.append(Seen(request.method, request.path, headers, body, raw_names))
        if self.key and request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response(_error("Invalid API key", "invalid_api_key"), status=401)
        if self.faults:
            fault = self.faults.pop(0)
            if fault != OK:
                return await self.misbehave(request, fault)
        try:
            if self.hold is not None:
                await self.hold.wait()
            if self.hang:
                await asyncio.sleep(3600)
            await asyncio.sleep(self.pause_before_headers)
        except asyncio.CancelledError:
            self.cancelled_at.append(time.monotonic())
            raise
        if self.status != 200:
            return web.json_response(
                self.error_body or _error("upstream failure", "server_error"),
                status=self.status,
                headers=self.error_headers,
            )
        payload = json.loads(body)
        if request.path.endswith("/embeddings"):
            answer = _embeddings(payload)
        elif payload.get("stream"):
            return await self.stream(request, payload)
        else:
            answer = _completion(payload, request.path)
        if self.send_usage:
            self.reported.append(answer["usage"])
        else:
            del answer["usage"]
        return web.json_response(answer, headers=self.extra_headers)

    async def misbehave(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        if fault.body is not None:
            return web.Response(
                status=fault.status or 200, body=fault.body, content_type="application/json"
            )
        if fault.status:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            body = _error(f"fault {fault.status}", "server_error")
            return web.json_response(body, status=fault.status, headers=headers)
        if fault.hang:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled_at.append(time.monotonic())
                raise
        if fault.malformed_json:
            return web.Response(body=b'{"id": "x", "choices": [', content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if fault.invalid_sse:
            await response.write(b"<html>502 Bad Gateway</html>")
        elif fault.first_token_delay:
            await asyncio.sleep(fault.first_token_delay)
            await response.write(b"data: [DONE]\n\n")
        elif fault.reset_after_first:
            await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"A"}}]}\n\n')
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
        return response

    async def stream(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **self.extra_headers}
        )
        await response.prepare(request)
        script = self.stream_script or _default_stream(
            payload, self.reported if self.send_usage else None
        )
        try:
            for n, step in enumerate(script):
                if self.cut_stream_after is not None and n >= self.cut_stream_after:
                    assert request.transport is not None
                    request.transport.abort()  # a reset mid-stream
                    return response
                if isinstance(step, float):
                    await asyncio.sleep(step)
                elif isinstance(step, asyncio.Event):
                    await step.wait()
                else:
                    await response.write(step)
                    await asyncio.sleep(self.chunk_pause)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled_at.append(time.monotonic())
            raise
        await response.write_eof()
        return response


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


def _reply_words(payload: dict[str, Any]) -> tuple[list[str], str]:
    words = REPLY.split(" ")
    limit = payload.get("max_tokens")
    if isinstance(limit, int) and limit < len(words):
        return words[:limit], "length"
    return words, "stop"


def _usage(payload: dict[str, Any], completion: int) -> dict[str, int]:
    prompt = len(json.dumps(payload.get("messages") or payload.get("prompt") or "")) // 4
    n = payload.get("n", 1)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion * n,
        "total_tokens": prompt + completion * n,
    }


def _completion(payload: dict[str, Any], path: str) -> dict[str, Any]:
    words, finish = _reply_words(payload)
    text = " ".join(words)
    n = payload.get("n", 1)
    if path.endswith("/completions") and not path.endswith("chat/completions"):
        choices: list[dict[str, Any]] = [
            {"index": i, "text": text, "finish_reason": finish, "logprobs": None} for i in range(n)
        ]
        kind = "text_completion"
    else:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            for i in range(n)
        ]
        kind = "chat.completion"
    return {
        "id": "chatcmpl-fake",
        "object": kind,
        "created": 1693721698,
        "model": payload["model"],
        "choices": choices,
        "usage": _usage(payload, len(words)),
    }


def _embeddings(payload: dict[str, Any]) -> dict[str, Any]:
    inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.25, -0.5, 1.0]}
        for i in range(len(inputs))
    ]
    return {
        "object": "list",
        "data": data,
        "model": payload["model"],
        "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
    }


def _default_stream(
    payload: dict[str, Any], reported: list[dict[str, int]] | None
) -> list[bytes | float | asyncio.Event]:
    words, finish = _reply_words(payload)
    wants_usage = bool((payload.get("stream_options") or {}).get("include_usage"))

    def event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1693721698,
            "model": payload["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if wants_usage and reported is not None:  # as OpenAI: "usage": null until the last
            chunk["usage"] = None
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    chunks: list[bytes | float | asyncio.Event] = [event({"role": "assistant", "content": ""})]
    chunks += [event({"content": (" " if i else "") + w}) for i, w in enumerate(words)]
    chunks.append(event({}, finish))
    if reported is not None and wants_usage:
        reported.append(_usage(payload, len(words)))
        usage = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "choices": [],
            "created": 1693721698,
            "model": payload["model"],
            "usage": _usage(payload, len(words)),
        }
        chunks.append(b"data: " + json.dumps(usage).encode() + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return chunks
