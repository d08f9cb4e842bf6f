"""A real Prometheus server for the tests: a free port, a temp storage dir, stopped after.

Outside CI a missing binary skips the tests that need it, loudly; under CI (CI=true)
it fails them, since .ci/run installs Debian's ``prometheus`` package.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import free_port, stop_process


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    reason = (
        f"!!! {name} is not installed: the Prometheus/dashboard/alert tests did NOT run. "
        "Install it with `apt-get install -y prometheus` (.ci/run does). !!!"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class PrometheusServer:
    def __init__(self, workdir: Path, config: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_path = workdir / "prometheus.yml"
        config_path.write_text(config)
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log()}")
            try:
                async with http.get(self.url + "/-/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"prometheus did not become ready:\n{self.log()}")

    async def api(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the whole answer, errors included (status, errorType, error)."""
        async with http.get(f"{self.url}/api/v1/{path}", params=params) as resp:
            return await resp.json()

    async def query(self, http: aiohttp.ClientSession, expr: str) -> Any:
        return await self.api(http, "query", query=expr)

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()
