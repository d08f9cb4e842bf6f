"""The command line as an operator meets it: ``llm-proxy`` (the installed command) and
``python -m proxy``, their version, their help, and a ``usage`` that cannot connect."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest

from tests.support import ROOT, free_port


def _run(*args: str, command: tuple[str, ...] = (sys.executable, "-m", "proxy")) -> str:
    done = subprocess.run(
        [*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_the_installed_command_and_the_module_say_their_version() -> None:
    installed = shutil.which("llm-proxy")
    assert installed is not None, "pip install -e . installs the llm-proxy command"
    release = version("llm-routing-proxy")
    assert _run("--version", command=(installed,)).strip() == f"llm-proxy {release}"
    assert _run("--version").strip() == f"python -m proxy {release}"


def test_help_says_what_it_is_and_shows_the_defaults() -> None:
    top = _run("--help")
    assert "An LLM routing proxy" in top and "``" not in top
    for command in ("serve", "check", "keygen", "usage"):
        assert command in top
    serve = " ".join(_run("serve", "--help").split())  # unwrapped
    for shown in (
        "(default: routes.yaml)",
        "(default: 127.0.0.1)",
        "(default: 8080)",
        "(default: 1)",
        "(default: 30.0)",
        "(default: INFO)",
        "(default: plain)",
    ):
        assert shown in serve
    assert "(default: False)" not in serve  # a flag that is off shows no default
    usage = " ".join(_run("usage", "--help").split())
    assert "(default: http://127.0.0.1:8080)" in usage


def test_usage_never_shows_the_admin_key_in_its_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_ADMIN_KEY", "admin-secret-in-env")
    assert "admin-secret-in-env" not in _run("usage", "--help")


def test_usage_names_the_url_it_could_not_reach() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", "--url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"cannot reach the proxy at {url}: ")
    assert "(--url says where it runs)" in done.stderr
