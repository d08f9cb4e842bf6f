"""Is a starting engine ready? GET its ready path until it answers 200."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.config.engine import ReadyCheck


class NotReady(Exception):
    """The engine exited or did not answer 200 within the ready timeout."""


async def wait_ready(
    session: aiohttp.ClientSession,
    url: str,
    check: ReadyCheck,
    process: asyncio.subprocess.Process,
) -> None:
    try:
        async with asyncio.timeout(check.timeout):
            while not await _answers(session, url, check.interval):
                if process.returncode is not None:
                    raise NotReady(f"exited with code {process.returncode} while starting")
                await asyncio.sleep(check.interval)
    except TimeoutError:
        raise NotReady(f"{url} did not answer 200 within {check.timeout:g}s") from None
    # The port may belong to a process that is not ours (a fixed port already in use).
    if process.returncode is not None:
        raise NotReady(f"exited with code {process.returncode} while starting")


async def _answers(session: aiohttp.ClientSession, url: str, interval: float) -> bool:
    timeout = aiohttp.ClientTimeout(total=max(interval * 4, 1.0))
    try:
        async with session.get(url, timeout=timeout, allow_redirects=False) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
