"""routes.yaml validation: every error reported with its YAML path, env vars, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config.load import ConfigError, parse_config
from proxy.config.model import CacheAware
from tests.support import ROOT

GOOD = """
providers:
  wandb:
    base_url: https://api.inference.wandb.ai/v1
    api_key: ${WANDB_API_KEY}
    headers: {OpenAI-Project: "${PROJECT:-acme/default}"}
    timeouts: {connect: 500ms, first_byte: 2m, idle: 30, total: 1h}
  prime:
    base_url: https://api.pinference.ai/api/v1/
    api_key: ${PRIME_API_KEY}
models:
  llama-70b:
    strategy: fallback
    targets:
      - {provider: prime, model: meta-llama/llama-3.1-70b-instruct}
      - {provider: wandb, model: meta-llama/Llama-3.1-70B-Instruct}
"""


def test_good_file_with_env_and_defaults():
    config = parse_config(GOOD, {"WANDB_API_KEY": "w-key"})
    wandb, prime = config.providers["wandb"], config.providers["prime"]
    assert wandb.api_key == "w-key" and wandb.missing_key_var is None
    assert wandb.headers == {"OpenAI-Project": "acme/default"}
    assert (wandb.timeouts.connect, wandb.timeouts.first_byte) == (0.5, 120.0)
    assert (wandb.timeouts.idle, wandb.timeouts.total) == (30.0, 3600.0)
    # Paths are joined, never guessed.
    wandb_url, prime_url = wandb.endpoints[0], prime.endpoints[0]
    assert (
        wandb_url.join("chat/completions") == "https://api.inference.wandb.ai/v1/chat/completions"
    )
    assert prime_url.join("chat/completions") == "https://api.pinference.ai/api/v1/chat/completions"
    assert prime.api_key is None and prime.missing_key_var == "PRIME_API_KEY"
    assert config.warnings == (
        "providers.prime.api_key: environment variable PRIME_API_KEY is not set; requests "
        "routed to provider 'prime' will fail until it is",
    )
    assert [t.provider for t in config.models["llama-70b"].targets] == ["prime", "wandb"]


def test_every_error_is_reported_with_its_path():
    bad = """
providers:
  prime:
    base_url: ftp://nowhere
    timeouts: {connect: soon}
    colour: blue
  wandb:
    base_url: https://api.inference.wandb.ai/v1
models:
  llama-70b:
    strategy: roulette
    targets:
      - {provider: prime, model: a}
      - {provider: prmie, model: b}
  empty:
    targets: []
  no-model:
    targets:
      - {provider: wandb}
extra: 1
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, {})
    assert caught.value.errors == [
        "extra: unknown key (did you mean 'retry'?)",
        "providers.prime.colour: unknown key (known: api_key, balance, base_url, cache_aware, "
        "circuit, endpoints, engine, headers, price, required, retry, stream_usage, timeouts)",
        "providers.prime.base_url: must be an http(s) URL with a host, got 'ftp://nowhere'",
        "providers.prime.timeouts.connect: must be a positive duration such as 30s, 500ms or "
        "2m, got 'soon'",
        "models.llama-70b.strategy: unknown strategy 'roulette' (known: fallback, least_busy, "
        "round_robin, weighted)",
        "models.llama-70b.targets[1].provider: unknown provider 'prmie' (did you mean 'prime'?)",
        "models.empty.targets: must be a non-empty list of {provider, model}",
        "models.no-model.targets[0].model: is required",
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "the file is empty"),
        ("providers: [1, 2]\nmodels: {}", "providers: must be a mapping, got list"),
        ("key: [unclosed", "yaml: "),
        (
            "providers:\n  p: {base_url: 'http://h/${HOST}'}\nmodels:\n  m:\n    targets:\n"
            "      - {provider: p, model: x}",
            "providers.p.base_url: environment variable HOST",
        ),
        (
            "server: {max_body_bytes: lots}\nproviders:\n  p: {base_url: 'http://h'}\nmodels:\n"
            "  m: {targets: [{provider: p, model: x}]}",
            "server.max_body_bytes: must be",
        ),
        (
            "server: {fast_path: 'no'}\nproviders:\n  p: {base_url: 'http://h'}\nmodels:\n"
            "  m: {targets: [{provider: p, model: x}]}",
            "server.fast_path: must be true or false, got 'no'",
        ),
    ],
)
def test_invalid_files(text: str, error: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors


def test_literal_dollar_and_sizes():
    config = parse_config(
        "server: {max_body_bytes: 2MiB}\nproviders:\n  p:\n    base_url: http://h/v1\n"
        "    api_key: 'pa$$word'\nmodels:\n  m: {targets: [{provider: p, model: x}]}",
        {},
    )
    assert config.providers["p"].api_key == "pa$word"
    assert config.server.max_body_bytes == 2 * 1024 * 1024


def _check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_check_command(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    result = _check(good)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK (2 providers, 1 models)" in result.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("provider: wandb", "provider: prmie"))
    result = _check(bad)
    assert result.returncode == 1
    assert "models.llama-70b.targets[1].provider: unknown provider 'prmie'" in result.stdout


def test_shipped_routes_yaml_is_valid():
    result = _check(ROOT / "routes.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("url", ["http://[::1/v1", "http://h:port/v1", "http://h:99999/v1"])
def test_url_that_does_not_parse_is_an_error(url: str):
    text = (
        f"providers:\n  p: {{base_url: '{url}'}}\n"
        "models:\n  m: {targets: [{provider: p, model: x}]}"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    assert "providers.p.base_url: is not a valid URL (check the host and the port)" in (
        caught.value.errors
    )


CREDENTIALS = "credentials in the URL are not allowed; use api_key or headers"
USERINFO_URLS = """
providers:
  one:
    base_url: https://user:pass-LITERAL@api.example/v1
  two:
    endpoints:
      - https://api.example/v1
      - https://:pass-LITERAL@api.example/v1
      - {url: "https://user:pass-LITERAL@api.example/v1", weight: 2}
models:
  m: {targets: [{provider: one, model: x}, {provider: two, model: x}]}
"""


def test_check_refuses_credentials_in_urls_without_printing_them(tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text(USERINFO_URLS)
    result = _check(path)
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines()[1:4] == [  # each with its file and line
        f"{path}:4: providers.one.base_url: {CREDENTIALS}",
        f"{path}:8: providers.two.endpoints[1]: {CREDENTIALS}",
        f"{path}:9: providers.two.endpoints[2].url: {CREDENTIALS}",
    ]
    assert "pass-LITERAL" not in result.stdout + result.stderr


def test_check_names_the_file_and_line_of_each_error(tmp_path: Path):
    """A YAML syntax error names the file, line and column (not PyYAML's "<unicode
    string>"); any other error the line of the key or item its path names, model ids
    with dots included."""
    path = tmp_path / "routes.yaml"
    path.write_text("providers:\n  p: {base_url: 'http://h/v1'}\nmodels: [x\nextra: 1\n")
    result = _check(path)
    assert result.returncode == 1
    assert result.stdout.splitlines()[1] == (f"{path}:4:6: yaml: expected ',' or ']', but got ':'")
    path.write_text(
        "providers:\n  p: {base_url: 'http://h/v1'}\nmodels:\n  llama-3.1-70b:\n"
        "    targets:\n      - {provider: p, model: a}\n      - {provider: q, model: b}\n"
    )
    result = _check(path)
    assert result.stdout.splitlines()[1:] == [
        f"{path}:7: models.llama-3.1-70b.targets[1].provider: unknown provider 'q' (known: p)"
    ]


SECRET = "S3cr3t-Value-xyz"
# Each of these errors echoes the value it refuses; the values come from the environment.
ECHOING = """
redis: {url: "redis//:${T_SECRET}@localhost:6379"}
providers:
  p:
    base_url: "ftp://${T_SECRET}.example/v1"
    balance: "${T_SECRET}"
    api_key: ${T_SECRET}
    headers: {X-Key: "${T_SECRET}"}
  q:
    endpoints: ["${T_URL}", {url: "http://h:${T_SECRET}/v1"}]
models:
  m: {targets: [{provider: "${T_SECRET}", model: x}, {provider: p, model: "${T_SECRET}"}]}
"""
SECRET_ENV = {"T_SECRET": SECRET, "T_URL": f"https://admin:{SECRET}@api.example/v1"}


def test_check_never_prints_a_value_from_the_environment(tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text(ECHOING)
    result = _check(path, SECRET_ENV)
    assert result.returncode == 1, result.stdout
    assert SECRET not in result.stdout + result.stderr
    errors = result.stdout.splitlines()[1:]
    assert len(errors) == 6, errors  # all but api_key, headers and the model id
    shown = "got 'ftp://${T_SECRET}.example/v1'"
    assert f"{path}:5: providers.p.base_url: must be an http(s) URL with a host, {shown}" in errors
    balance = f"{path}:6: providers.p.balance: unknown balance '${{T_SECRET}}'"
    assert any(e.startswith(balance) for e in errors)


_MINIMAL = (
    "providers: {p: {base_url: 'http://h'}}\nmodels: {m: {targets: [{provider: p, model: x}]}}\n"
)


@pytest.mark.parametrize(
    ("redis", "urls", "replicas"),
    [
        ("{url: 'redis://h:6379/0'}", ("redis://h:6379/0",), 0),
        ("{url: ['redis://a:7000', 'rediss://b:7001']}", ("redis://a:7000", "rediss://b:7001"), 0),
        (
            "{url: 'redis+sentinel://s1:26379,s2:26379/main', ledger_replicas: 1}",
            ("redis+sentinel://s1:26379,s2:26379/main",),
            1,
        ),
        ("{url: 'rediss+sentinel://:pw@s1/main'}", ("rediss+sentinel://:pw@s1/main",), 0),
        ("{url: '', ledger_replicas: 0}", (), 0),
    ],
)
def test_redis_url_takes_one_url_seed_nodes_or_sentinels(
    redis: str, urls: tuple[str, ...], replicas: int
) -> None:
    config = parse_config(f"redis: {redis}\n" + _MINIMAL, {})
    assert (config.redis.urls, config.redis.ledger_replicas) == (urls, replicas)


@pytest.mark.parametrize(
    ("redis", "error"),
    [
        (
            "{url: 'http://h:6379'}",
            "redis.url: must start with redis://, rediss://, unix://, redis+sentinel:// or "
            "rediss+sentinel://, got 'http://h:6379'",
        ),
        (
            "{url: ['redis://a:1', 'redis+sentinel://s:26379/m']}",
            "redis.url[1]: redis+sentinel:// names the whole deployment: list no other URL",
        ),
        ("{url: ['redis://a:1', '']}", "redis.url[1]: must not be empty"),
        (
            "{url: 'redis://a:1', ledger_replicas: -1}",
            "redis.ledger_replicas: must be a whole number of at least 1, got -1",
        ),
        (
            "{url: 'redis://a:1', ledger_replicas: true}",
            "redis.ledger_replicas: must be a whole number of at least 1, got True",
        ),
    ],
)
def test_a_redis_url_that_cannot_work_is_refused_with_its_path(redis: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"redis: {redis}\n" + _MINIMAL, {})
    assert error in caught.value.errors, caught.value.errors


def test_cache_aware_knobs_are_read_and_checked() -> None:
    good = """
providers:
  pool:
    endpoints: [http://a:1/v1, http://b:1/v1]
    balance: cache_aware
    cache_aware: {block_bytes: 128, index_memory: 1MiB, load_weight: 0.25,
                  imbalance_calls: 2, imbalance_ratio: 3}
models:
  m: {targets: [{provider: pool, model: m}]}
"""
    provider = parse_config(good, {}).providers["pool"]
    assert provider.balance == "cache_aware"
    assert provider.cache_aware == CacheAware(128, 2**20, 0.25, 2, 3.0)
    bad = good.replace("load_weight: 0.25", "load_weight: -1, colour: 1")
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, {})
    assert caught.value.errors == [
        "providers.pool.cache_aware.colour: unknown key (known: block_bytes, imbalance_calls, "
        "imbalance_ratio, index_memory, load_weight)",
        "providers.pool.cache_aware.load_weight: must be a positive number, got -1",
    ]
