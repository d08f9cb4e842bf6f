"""Runs pytest for tools/mutate.py, one forked child per run, in the current directory.

It imports pytest and the libraries the tests use once, then forks a child per request,
so a mutant does not pay for those imports again (the way mutmut's own runner saves
them). It never imports ``proxy``: each child imports the mutated copy afresh.

Protocol, one JSON line each way: a request is the list of pytest arguments; the answer
is ``{"pid": N}`` at once, then ``{"code": exit code}`` when the child ends. Each child
leads its own process group, so the driver can end it and the servers it started.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys

# Some of them are, or import, pytest plugins, whose asserts pytest then cannot rewrite:
# the driver passes -W to ignore that warning, which the suite's settings make an error.
PRELOAD = (
    "pytest",
    "aiohttp",
    "redis",
    "yaml",
    "prometheus_client",
    "hypothesis",
    "uvloop",
    "httptools",
    "trustme",
    "openai",
)


def child(args: list[str]) -> int:
    import pytest

    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.path.insert(0, os.getcwd())
    return int(pytest.main(args))


def main() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                code = child(json.loads(line))
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
