"""Bad input gets a clear OpenAI-shaped 4xx, never a 500 and never a hung worker."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Proxy
from tests.support import ProxyProcess, Upstream, dead_url, free_port

DEAD = dead_url()  # valid calls always get a fast 502
ROUTES = f"""
server: {{keepalive_timeout: 1s, body_timeout: 1s, max_body_bytes: 64KiB}}
retry: {{attempts: 1}}
# Every valid call fails at the dead port: the circuit must not turn its 502s into 503s.
circuit: {{failures: 1000000}}
providers:
  p: {{base_url: "{DEAD}"}}
models:
  m: {{targets: [{{provider: p, model: upstream-m}}]}}
"""


@pytest.fixture(scope="module")
def proxy_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    path: Path = tmp_path_factory.mktemp("bad-input") / "routes.yaml"
    path.write_text(ROUTES)
    process = ProxyProcess(path, free_port())
    deadline = time.monotonic() + 20
    while "proxy listening" not in process.log():
        assert process.process.poll() is None and time.monotonic() < deadline, process.log()
        time.sleep(0.05)
    yield process
    assert process.stop() == 0


def _post(process: ProxyProcess, body: bytes, headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
KNOWN = st.fixed_dictionaries(
    {}, optional={"model": JSON | st.just("m"), "messages": JSON, "stream": JSON,
                  "max_tokens": JSON, "n": JSON},
)  # fmt: skip
BODIES = (
    st.binary(max_size=300)
    | JSON.map(lambda v: json.dumps(v).encode())
    | st.tuples(KNOWN, st.dictionaries(st.text(), JSON, max_size=3)).map(
        lambda parts: json.dumps({**parts[1], **parts[0]}).encode()
    )
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=BODIES)
def test_fuzzed_bodies_get_a_clear_answer(proxy_process: ProxyProcess, body: bytes):
    status, answer = _post(proxy_process, body, {"Content-Type": "application/json"})
    assert status in (400, 404, 502), (status, answer)
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] in ("invalid_request_error", "server_error")
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]


def test_a_client_trickling_its_headers_is_cut_off(proxy_process: ProxyProcess):
    with socket.create_connection(("127.0.0.1", proxy_process.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        for _ in range(20):  # one header byte every 0.25 s: never a complete request
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.25)
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except ConnectionResetError:
                closed = True
                break
        assert closed, "the proxy kept a trickling connection open"
        assert time.monotonic() - started < 4


def test_a_client_that_stops_sending_its_body_gets_408(proxy_process: ProxyProcess):
    with socket.create_connection(("127.0.0.1", proxy_process.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"mo'
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"


async def test_client_cannot_steer_host_or_path(proxy: Proxy, wandb: Upstream):
    headers = {
        "Host": "evil.example",
        "X-Forwarded-Host": "evil.example",
        "X-Original-URL": "/admin",
        "Forwarded": "host=evil.example",
    }
    for model in ("../../admin", "http://evil.example/v1", "llama-8b/../../x", "llama-8b?x=1"):
        async with proxy.http.post(
            proxy.url + "/v1/chat/completions",
            headers=headers,
            json={"model": model, "messages": []},
        ) as resp:
            assert resp.status == 404
    assert not wandb.fake.seen
    async with proxy.http.post(
        proxy.url + "/v1/chat/completions",
        headers=headers,
        json={"model": "llama-8b", "messages": []},
    ) as resp:
        assert resp.status == 200
    seen = wandb.fake.last
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Host"] == wandb.url.split("//")[1].split("/")[0]
    assert "evil.example" not in json.dumps(dict(seen.headers))


@pytest.mark.parametrize("size", [70_000, 1_000])
def test_a_chunked_body_is_bounded_whether_or_not_it_is_all_in(
    proxy_process: ProxyProcess, size: int
):
    """Without Content-Length the limit is checked while reading; a body that arrived
    whole is read without a timer (issue 7), and must be bounded the same."""
    body = b'{"model": "m", "messages": [], "x": "' + b"a" * size + b'"}'
    with socket.create_connection(("127.0.0.1", proxy_process.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n"
            % (len(body), body)
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, answer = reply.partition(b"\r\n\r\n")
    if size > 64 * 1024:
        assert head.startswith(b"HTTP/1.1 413"), head
        assert b"larger than this proxy accepts" in answer
    else:
        assert head.startswith(b"HTTP/1.1 502"), head  # read whole, routed, upstream dead
