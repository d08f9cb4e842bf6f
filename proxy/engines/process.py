"""One engine OS process: spawn it so it cannot outlive the proxy, pump its output, stop it.

Two guards keep an engine from outliving the proxy:
- the child asks the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to be killed when
  its parent dies, which holds even when the proxy is killed with SIGKILL;
- it runs in its own process group (a new session), so a normal stop signals the whole
  group, helpers the engine started included, and never the proxy's own group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from collections.abc import Mapping

from proxy.pdeathsig import parent_death_signal

log = logging.getLogger(__name__)
output_log = logging.getLogger("proxy.engines.output")


async def spawn(
    argv: list[str], env: Mapping[str, str], label: str
) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    """Start the engine and a task that copies its output to the log, line by line."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **env},
        start_new_session=True,
        preexec_fn=parent_death_signal(signal.SIGKILL),
    )
    assert process.stdout is not None
    pump = asyncio.create_task(_pump(process.stdout, label))
    return process, pump


async def _pump(stream: asyncio.StreamReader, label: str) -> None:
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line longer than the reader's limit: take what is there
            line = await stream.read(65536)
        if not line:
            return
        text = line.decode(errors="replace").rstrip()
        output_log.log(line_level(text), "[%s] %s", label, text)


# llama.cpp's server starts each line with its clock and a level letter
# ("0.00.006.267 I srv  load_model: ..."); other engines (vLLM) print level words.
_LLAMA_LEVEL = re.compile(r"\d+\.\d+\.\d+\.\d+ ([DIWE]) ")
_LETTERS = {"W": logging.WARNING, "E": logging.ERROR}
_ERROR_WORDS = re.compile(r"\b(error|exception|traceback|fatal|critical)\b", re.IGNORECASE)
_WARNING_WORDS = re.compile(r"\bwarn(ing)?\b", re.IGNORECASE)


def line_level(line: str) -> int:
    """An engine's line at DEBUG unless it warns or errs: its chatter was most of the
    proxy's log (78 % of the lines with llama.cpp at INFO). The launcher's own lines
    (what it serves, a model download) stay at INFO."""
    if line.startswith("llamacpp: "):
        return logging.INFO
    if found := _LLAMA_LEVEL.match(line):
        return _LETTERS.get(found.group(1), logging.DEBUG)
    if _ERROR_WORDS.search(line):
        return logging.ERROR
    if _WARNING_WORDS.search(line):
        return logging.WARNING
    return logging.DEBUG


def signal_group(pid: int, signum: int) -> None:
    # start_new_session made the engine its group's leader, so its pid is the group id;
    # the group lives on as long as any member does, even after the leader exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


async def terminate(process: asyncio.subprocess.Process, grace: float, label: str) -> None:
    """SIGTERM to the group, SIGKILL after ``grace`` seconds; always reap the leader."""
    if process.returncode is None:
        signal_group(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            log.warning("engine %s did not stop in %.0fs after SIGTERM: killing it", label, grace)
    signal_group(process.pid, signal.SIGKILL)  # stragglers in the group, if any
    await process.wait()
    # asyncio leaves an exited process's transport open (ResourceWarning when it is
    # collected); nothing else refers to it now.
    transport = getattr(process, "_transport", None)
    if transport is not None:
        transport.close()
