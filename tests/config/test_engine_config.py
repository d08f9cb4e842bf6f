"""The engine: block of routes.yaml: defaults, every error with its YAML path, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.engine import QueueSpec, ReadyCheck, RestartPolicy
from proxy.config.load import ConfigError, parse_config
from tests.support import serve_and_exit

MODELS = "models:\n  m: {targets: [{provider: local, model: m}]}\n"


def test_engine_defaults_and_values():
    config = parse_config(
        """
providers:
  local:
    engine:
      command: ["{python}", "-m", "engine", "--port", "{port}"]
      replicas: 2
      start: first_request
      ready: {path: /v1/models, timeout: 30s}
      restart: {base_delay: 500ms, max_delay: 10s}
      idle_unload: 15m
      env: {OMP_NUM_THREADS: "1"}
"""
        + MODELS,
        {},
    )
    provider = config.providers["local"]
    spec = provider.engine
    assert spec is not None
    assert spec.command == ("{python}", "-m", "engine", "--port", "{port}")
    assert (spec.port, spec.host, spec.api_path, spec.replicas) == (None, "127.0.0.1", "/v1", 2)
    assert spec.start == "first_request"
    assert spec.ready == ReadyCheck(path="/v1/models", timeout=30.0, interval=0.25)
    assert spec.restart == RestartPolicy(base_delay=0.5, max_delay=10.0)
    assert (spec.idle_unload, spec.wait, spec.metrics_path) == (900.0, 60.0, None)
    assert spec.env == {"OMP_NUM_THREADS": "1"}
    assert provider.base_url == "http://127.0.0.1:{port}/v1"  # filled in per replica


def test_every_engine_error_is_reported_with_its_path():
    bad = """
providers:
  local:
    base_url: http://127.0.0.1:8000/v1
    engine:
      command: []
      port: 70000
      replicas: 0
      start: sometimes
      ready: {path: health, timeout: never, when: now}
      restart: {base_delay: 10s, max_delay: 1s}
      idle_unload: soon
      colour: blue
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(bad + MODELS, {})
    assert caught.value.errors == [
        "providers.local.engine.colour: unknown key (known: api_path, command, env, host, "
        "idle_unload, metrics_path, port, queue, ready, replicas, restart, slots, start, "
        "stop_timeout, wait)",
        "providers.local.engine.command: must be a non-empty list of strings (the program and "
        "its arguments)",
        "providers.local.engine.port: must be 'auto' or a port number 1-65535, got 70000",
        "providers.local.engine.replicas: must be a whole number from 1 to 64, got 0",
        "providers.local.engine.start: must be one of boot, first_request, got 'sometimes'",
        "providers.local.engine.ready.when: unknown key (known: interval, path, timeout)",
        "providers.local.engine.ready.path: must start with '/', got 'health'",
        "providers.local.engine.ready.timeout: must be a positive duration such as 30s, 500ms "
        "or 2m, got 'never'",
        "providers.local.engine.restart.max_delay: must not be shorter than base_delay",
        "providers.local.engine.idle_unload: must be a positive duration such as 30s, 500ms or "
        "2m, got 'soon'",
        "providers.local.base_url: an engine's URL is chosen by the proxy: remove base_url",
        "models: at least one model is required",  # its only model's provider is invalid
    ]


def _engine(engine: str, extra: str = "", model: str = "") -> str:
    return f"""
providers:
  local:
    engine:
{engine}
{extra}
models:
  m: {{targets: [{{provider: local, model: m}}]{model}}}
"""


LLAMACPP = '      command: ["{python}", "-m", "proxy.engines.llamacpp", "--port", "{port}"'


def test_slots_come_from_llama_cpp_s_parallel_or_are_set_and_the_queue_has_defaults():
    def spec(engine: str) -> tuple[int, QueueSpec]:
        provider = parse_config(_engine(engine), {}).providers["local"]
        assert provider.engine is not None
        return provider.engine.slots, provider.engine.queue

    assert spec(LLAMACPP + "]") == (1, QueueSpec(max=64, wait=30.0))
    assert spec(LLAMACPP + ', "--parallel", "4"]')[0] == 4
    assert spec(LLAMACPP + ', "-np", "3"]')[0] == 3
    assert spec(LLAMACPP + ', "--parallel=2"]')[0] == 2
    written = LLAMACPP + ', "-np", "3"]\n      slots: 8\n      queue: {max: 0, wait: 2s}'
    assert spec(written) == (8, QueueSpec(max=0, wait=2.0))


HASHES = [f"sha256:{digit * 64}" for digit in "01"]


def _teams(*weights: str) -> str:
    rows = [f'  {t}: {{keys: ["{h}"]{w}}}' for t, h, w in zip("tu", HASHES, weights, strict=False)]
    return "teams:\n" + "\n".join(rows)


def test_weights_spill_after_and_queue_errors_have_their_paths():
    bad = _engine(
        LLAMACPP + "]\n      slots: 0\n      queue: {max: -1, wait: soon, depth: 3}",
        _teams(", weight: 0"),
        ", spill_after: later",
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, {})
    assert caught.value.errors == [
        "providers.local.engine.slots: must be a whole number from 1 to 64, got 0",
        "providers.local.engine.queue.depth: unknown key (known: max, wait)",
        "providers.local.engine.queue.max: must be a whole number from 0 to 100000, got -1",
        "providers.local.engine.queue.wait: must be a positive duration such as 30s, 500ms "
        "or 2m, got 'soon'",
        "models.m.spill_after: must be a positive duration such as 30s, 500ms or 2m, got 'later'",
        "teams.t.weight: must be a positive number, got 0",
    ]
    good = _engine(LLAMACPP + "]", _teams(", weight: 2.5", ""), ", spill_after: 800ms")
    config = parse_config(good, {})
    assert (config.teams["t"].weight, config.teams["u"].weight) == (2.5, 1.0)
    assert config.models["m"].spill_after == 0.8


def test_workers_refuse_a_fixed_engine_port(tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text(
        "providers:\n  local:\n    engine: {command: [x], port: 8000}\n" + MODELS,
    )
    result = serve_and_exit(path, "--workers", "2")
    assert result.returncode == 2
    assert "--workers > 1 needs port: auto for engines (local)" in result.stderr
