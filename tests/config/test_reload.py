"""routes.yaml hot reload: swapped whole and atomically, refused whole when bad."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy.app import make_app
from proxy.config.load import load_config
from proxy.config.reload import ConfigHolder
from tests.config.test_config import CREDENTIALS, ECHOING, SECRET, SECRET_ENV, USERINFO_URLS
from tests.conftest import Proxy, StartApp
from tests.support import ProxyProcess, Upstream, eventually, free_port, routes_yaml

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
NEW_MODEL = "  brand-new:\n    targets:\n      - {provider: wandb, model: new/upstream-id}\n"


async def _model_ids(proxy_url: str, http) -> list[str]:
    async with http.get(proxy_url + "/v1/models") as resp:
        return [m["id"] for m in (await resp.json())["data"]]


async def _eventually(check, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def test_file_change_is_picked_up(
    proxy: Proxy, wandb: Upstream, prime: Upstream, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="proxy.config.reload")
    changed = routes_yaml(wandb, prime, extra=NEW_MODEL).replace(
        "model: meta-llama/Llama-3.1-8B-Instruct", "model: another/upstream-id", 1
    )
    assert changed != routes_yaml(wandb, prime, extra=NEW_MODEL)
    proxy.write_config(changed)

    async def has_new() -> bool:
        return "brand-new" in await _model_ids(proxy.url, proxy.http)

    await _eventually(has_new)
    async with proxy.http.post(
        proxy.url + CHAT, json={"model": "brand-new", "messages": MESSAGES}
    ) as resp:
        assert resp.status == 200
    assert wandb.fake.last.json()["model"] == "new/upstream-id"
    # One line says what changed: a model added, one whose target changed.
    assert f"config reloaded from {proxy.path}: models +brand-new ~llama-8b" in caplog.text


async def test_bad_file_is_refused_and_old_config_serves(
    proxy: Proxy, wandb: Upstream, prime: Upstream, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.ERROR, logger="proxy.config.reload")
    bad = routes_yaml(wandb, prime, extra=NEW_MODEL).replace(
        "provider: wandb, model: new", "provider: wandbb, model: new"
    )
    proxy.write_config(bad)

    async def refused() -> bool:
        return proxy.holder.reloads["error"] >= 1

    await _eventually(refused)
    # The file and the line of the error.
    line = bad.splitlines().index("      - {provider: wandbb, model: new/upstream-id}") + 1
    unknown = "models.brand-new.targets[0].provider: unknown provider 'wandbb'"
    assert f"{proxy.path}:{line}: {unknown}" in caplog.text
    assert await _model_ids(proxy.url, proxy.http) == ["llama-70b", "llama-8b", "same-name"]
    async with proxy.http.post(
        proxy.url + CHAT, json={"model": "llama-8b", "messages": MESSAGES}
    ) as resp:
        assert resp.status == 200


async def test_reload_under_load_fails_nothing_in_flight(
    proxy: Proxy, wandb: Upstream, prime: Upstream
):
    # A stream is held open by the upstream while routes change under it: llama-8b
    # disappears and llama-70b moves to wandb only. The stream and every concurrent
    # call still finish on the config they started with.
    release = asyncio.Event()
    wandb.fake.stream_script = [b"data: {}\n\n", release, b"data: [DONE]\n\n"]
    stream = await proxy.http.post(
        proxy.url + CHAT, json={"model": "llama-8b", "messages": MESSAGES, "stream": True}
    )
    assert await stream.content.readany() == b"data: {}\n\n"
    prime.fake.pause_before_headers = 0.3  # calls in flight across the swap

    async def call() -> int:
        async with proxy.http.post(
            proxy.url + CHAT, json={"model": "llama-70b", "messages": MESSAGES}
        ) as resp:
            return resp.status

    calls = [asyncio.create_task(call()) for _ in range(20)]
    await eventually(lambda: len(prime.fake.seen) == 20)  # all routed, held by prime
    swapped = (
        routes_yaml(wandb, prime)
        .replace("      - {provider: prime, model: meta-llama/llama-3.1-70b-instruct}\n", "")
        .replace(
            "  llama-8b:\n    targets:\n      - {provider: wandb, model: "
            "meta-llama/Llama-3.1-8B-Instruct}\n",
            "",
        )
    )
    proxy.write_config(swapped)

    async def swapped_in() -> bool:
        return "llama-8b" not in await _model_ids(proxy.url, proxy.http)

    await _eventually(swapped_in)
    assert await asyncio.gather(*calls) == [200] * 20
    release.set()
    assert await stream.read() == b"data: [DONE]\n\n"
    stream.close()
    assert len(prime.fake.seen) == 20  # all started before the swap, all on the old route


async def test_sighup_reloads_a_running_process(tmp_path: Path, wandb: Upstream, prime: Upstream):
    path = tmp_path / "routes.yaml"
    # A poll interval of an hour: only the signal can explain the reload.
    path.write_text(routes_yaml(wandb, prime, reload_interval="1h"))
    process = ProxyProcess(path, free_port())
    try:
        await process.wait_listening()
        path.write_text(routes_yaml(wandb, prime, extra=NEW_MODEL, reload_interval="1h"))
        async with aiohttp.ClientSession() as http:
            assert "brand-new" not in await _model_ids(process.url, http)
            process.signal(signal.SIGHUP)

            async def has_new() -> bool:
                return "brand-new" in await _model_ids(process.url, http)

            await _eventually(has_new)
    finally:
        assert process.stop() == 0
    assert "config reloaded" in process.log()


async def _refused_reload(tmp_path: Path, good: str, bad: str) -> str:
    """A proxy process started on ``good``, given ``bad``: its log once it refused it."""
    path = tmp_path / "routes.yaml"
    path.write_text(good)
    process = ProxyProcess(path, free_port(), env=SECRET_ENV)
    try:
        await process.wait_listening()
        path.write_text(bad)
        refused = f"config reload of {path} refused, the running config stays: "
        await eventually(lambda: refused in process.log(), 20)
    finally:
        assert process.stop() == 0
    return process.log()


async def test_reload_refuses_credentials_in_urls(tmp_path: Path, wandb: Upstream, prime: Upstream):
    log = await _refused_reload(tmp_path, routes_yaml(wandb, prime), USERINFO_URLS)
    assert f"providers.one.base_url: {CREDENTIALS}" in log
    assert f"providers.two.endpoints[2].url: {CREDENTIALS}" in log
    assert "pass-LITERAL" not in log


async def test_reload_errors_never_log_a_value_from_the_environment(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    log = await _refused_reload(tmp_path, routes_yaml(wandb, prime), ECHOING)
    assert "providers.p.balance: unknown balance '${T_SECRET}'" in log
    assert SECRET not in log


async def test_configmap_symlink_swap_is_picked_up(
    tmp_path: Path, start_app: StartApp, wandb: Upstream, prime: Upstream
):
    """As kubelet updates a ConfigMap volume: routes.yaml -> ..data/routes.yaml, and
    ..data -> a timestamped directory; an update writes a new directory and renames a
    new ..data link over the old one, so the path's own link never changes."""
    volume = tmp_path / "volume"
    (volume / "..2026_01").mkdir(parents=True)
    (volume / "..2026_01" / "routes.yaml").write_text(routes_yaml(wandb, prime))
    (volume / "..data").symlink_to("..2026_01")
    path = volume / "routes.yaml"
    path.symlink_to("..data/routes.yaml")
    holder = ConfigHolder(load_config(path), path)
    url = await start_app(make_app(holder))
    (volume / "..2026_02").mkdir()
    (volume / "..2026_02" / "routes.yaml").write_text(routes_yaml(wandb, prime, extra=NEW_MODEL))
    (volume / "..data_tmp").symlink_to("..2026_02")
    os.rename(volume / "..data_tmp", volume / "..data")  # atomic, as kubelet does
    shutil.rmtree(volume / "..2026_01")
    async with aiohttp.ClientSession() as http:

        async def has_new() -> bool:
            return "brand-new" in await _model_ids(url, http)

        await _eventually(has_new)
    assert holder.reloads == {"ok": 1, "error": 0}
