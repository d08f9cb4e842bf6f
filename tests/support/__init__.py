"""Helpers that start real servers on real ports for the tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.server import Serving, start_server
from proxy.services import SERVICES
from tests.support.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[2]


async def serve_app(app: web.Application) -> tuple[web.AppRunner | Serving, str]:
    """The app on a free port, and its URL; ``cleanup()`` of the first item stops it."""
    runner: web.AppRunner | Serving
    if SERVICES in app:  # the proxy itself: served as in production, the front first
        runner = await start_server(app, "127.0.0.1", 0)
    else:
        # handler_cancellation as in production, so a closed connection cancels the handler.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@dataclass
class Upstream:
    fake: FakeUpstream
    url: str  # the base_url to put in routes.yaml, prefix included


def routes_yaml(
    wandb: Upstream,
    prime: Upstream,
    extra: str = "",
    reload_interval: str = "100ms",
    retry: str = "{attempts: 1}",
) -> str:
    """Two providers like the seeds, three models; ``extra`` adds models at the end."""
    return f"""
server:
  reload_interval: {reload_interval}
retry: {retry}
providers:
  wandb:
    base_url: {wandb.url}
    api_key: ${{TEST_WANDB_KEY}}
    headers: {{OpenAI-Project: acme/research}}
    timeouts: {{connect: 2s, first_byte: 3s, idle: 2s, total: 20s}}
  prime:
    base_url: {prime.url}
    api_key: ${{TEST_PRIME_KEY}}
    headers: {{X-Prime-Team-ID: team-42}}
    timeouts: {{connect: 2s, first_byte: 3s, idle: 2s, total: 20s}}
models:
  llama-70b:
    targets:
      - {{provider: prime, model: meta-llama/llama-3.1-70b-instruct}}
      - {{provider: wandb, model: meta-llama/Llama-3.1-70B-Instruct}}
  llama-8b:
    targets:
      - {{provider: wandb, model: meta-llama/Llama-3.1-8B-Instruct}}
  same-name:
    targets:
      - {{provider: wandb, model: same-name}}
{extra}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProxyProcess:
    """``python -m proxy serve`` as a real child process."""

    def __init__(self, config: Path, port: int, *args: str, env: dict[str, str] | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = config.with_suffix(f".{port}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *args,
            ],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_listening(self, workers: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(r"proxy listening on", self.log())) >= workers:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited early:\n{self.log()}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"proxy did not start:\n{self.log()}")

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def stop(self) -> int:
        code = stop_process(self.process)
        self._log.close()
        return code


def serve_and_exit(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m proxy serve`` that is expected to refuse to start: its exit and output."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, and SIGKILL if it has not exited 15 s later; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until ``predicate()`` holds, failing after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


_HELD: list[socket.socket] = []


def dead_url(prefix: str = "/v1") -> str:
    """A URL whose port is bound but never listens: connections are refused at once, and
    no other process can take the port while the tests run."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}{prefix}"
