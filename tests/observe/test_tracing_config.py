"""routes.yaml's telemetry block, the OpenTelemetry packages as an extra, and a proxy
without telemetry that loads nothing of OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config.load import ConfigError, parse_config
from proxy.config.telemetry import Telemetry
from tests.support import ROOT, free_port

BASE = """
providers:
  p: {base_url: 'http://127.0.0.1:9/v1'}
models:
  m: {targets: [{provider: p, model: x}]}
"""


def test_telemetry_is_off_unless_configured_and_has_defaults():
    assert parse_config(BASE, {}).telemetry is None
    config = parse_config(BASE + "telemetry: {otlp_endpoint: 'http://collector:4318'}", {})
    assert config.telemetry == Telemetry("http://collector:4318", "llm-routing-proxy", 1.0)
    assert config.telemetry.traces_url == "http://collector:4318/v1/traces"
    given = Telemetry("https://c.example/otlp/v1/traces/", "s", 0.5)
    assert given.traces_url == "https://c.example/otlp/v1/traces"


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ("{service_name: x}", "telemetry.otlp_endpoint: is required"),
        ("{otlp_endpoint: 'collector:4318'}", "telemetry.otlp_endpoint: must be an http(s) URL"),
        ("{otlp_endpoint: 'http://c:4318', sample_ratio: 1.5}", "telemetry.sample_ratio: must be"),
        ("{otlp_endpoint: 'http://c:4318', sample_ratio: true}", "telemetry.sample_ratio: must be"),
        ("{otlp_endpoint: 'http://c:4318', sampling: 1}", "telemetry.sampling: unknown key"),
        ("[http://c:4318]", "telemetry: must be a mapping"),
    ],
)
def test_telemetry_errors_name_their_field(block: str, error: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + f"telemetry: {block}\n", {})
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors


def test_telemetry_without_the_packages_is_refused_naming_the_extra(tmp_path: Path):
    """As `pip install llm-routing-proxy` without [otel] leaves it: no opentelemetry."""
    shadow = tmp_path / "without-otel" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError('not installed')\n")
    config = tmp_path / "routes.yaml"
    config.write_text(BASE + "telemetry:\n  otlp_endpoint: 'http://127.0.0.1:4318'\n")
    env = {"PYTHONPATH": str(shadow.parent), "PATH": "/usr/bin:/bin"}
    wanted = f"{config}:6: telemetry: needs the OpenTelemetry SDK and its OTLP/HTTP exporter"
    for command in (["check", str(config)], ["serve", "--config", str(config)]):
        if command[0] == "serve":
            command += ["--port", str(free_port())]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", *command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert wanted in output, output
        assert "pip install 'llm-routing-proxy[otel]'" in output


_WITHOUT_TELEMETRY = """
import asyncio, importlib, pkgutil, sys
import proxy
from aiohttp import web
for module in pkgutil.walk_packages(proxy.__path__, "proxy."):
    # Not spans.py, OpenTelemetry's side, nor __main__, which would run the command line.
    if module.name not in ("proxy.observe.spans", "proxy.__main__"):
        importlib.import_module(module.name)
from proxy.app import make_app
from proxy.config.load import load_config
from proxy.config.reload import ConfigHolder

async def main():
    runner = web.AppRunner(make_app(ConfigHolder(load_config(sys.argv[1]))))
    await runner.setup()  # every start-up step, the traces' included
    await runner.cleanup()

asyncio.run(main())
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""


def test_without_telemetry_nothing_of_opentelemetry_is_imported(tmp_path: Path):
    config = tmp_path / "routes.yaml"
    config.write_text(BASE)
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TELEMETRY, str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
