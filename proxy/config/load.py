"""routes.yaml → ``Config``, validated as a whole: every error is reported with its YAML path."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from proxy.config.accounting import read_accounting
from proxy.config.engine import EngineSpec
from proxy.config.engine_load import read_engine
from proxy.config.envsubst import expand
from proxy.config.fields import FieldReader, hint
from proxy.config.locate import located
from proxy.config.model import (
    BALANCES,
    MAX_TOKENS_FIELDS,
    STRATEGIES,
    CacheAware,
    CircuitPolicy,
    Config,
    Endpoint,
    Model,
    OutputCap,
    Provider,
    RetryPolicy,
    ServerSettings,
    Target,
    Timeouts,
    frozen_map,
)
from proxy.config.prices import read_price
from proxy.config.teams import (
    expired_keys,
    key_index,
    read_redis,
    read_teams,
)
from proxy.config.telemetry import read_telemetry

TOP_KEYS = {
    "redis", "server", "providers", "models", "retry", "circuit", "teams", "accounting",
    "admin_key", "telemetry",
}  # fmt: skip
PROVIDER_KEYS = {
    "base_url", "endpoints", "balance", "api_key", "headers", "timeouts", "retry", "circuit",
    "required", "stream_usage", "engine", "price", "cache_aware",
}  # fmt: skip
MODEL_KEYS = {"targets", "strategy", "owned_by", "retry", "max_tokens", "spill_after"}
OUTPUT_CAP_KEYS = {"default", "limit", "field"}
# The largest count a client may send (proxy.limits.usage.MAX_COUNT): a default above it
# would be injected and reserved as no client could ask.
MAX_OUTPUT_CAP = 2**31 - 1
TARGET_KEYS = {"provider", "model", "weight", "price"}
ENDPOINT_KEYS = {"url", "weight"}
# Each block: key → kind, so that one reader serves them all.
SERVER_FIELDS = {
    "max_body_bytes": "size", "reload_interval": "duration", "body_timeout": "duration",
    "keepalive_timeout": "duration", "max_answer_bytes": "size", "fast_path": "boolean",
}  # fmt: skip
TIMEOUT_FIELDS = dict.fromkeys(("connect", "first_byte", "idle", "total"), "duration")
RETRY_FIELDS = {
    "attempts": "count", "base_delay": "duration", "max_delay": "duration",
    "max_retry_after": "duration", "budget": "duration",
}  # fmt: skip
CIRCUIT_FIELDS = {"failures": "count", "cooldown": "duration", "max_cooldown": "duration"}
CACHE_AWARE_FIELDS = {
    "block_bytes": "count", "index_memory": "size", "load_weight": "number",
    "imbalance_calls": "count", "imbalance_ratio": "number",
}  # fmt: skip


class ConfigError(Exception):
    def __init__(self, errors: list[str], located: bool = False):
        super().__init__("\n".join(errors))
        self.errors = errors
        self.located = located  # each error names its file (and line) already


def _yaml_error(exc: yaml.YAMLError, name: str) -> ConfigError:
    """``routes.yaml:3:5: yaml: mapping values are not allowed here``: the file, not
    PyYAML's "<unicode string>", and where it stopped."""
    if not name:
        return ConfigError([f"yaml: {exc}"])
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
    return ConfigError([f"{where}: yaml: {problem}"], located=True)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    try:
        return parse_config(text, os.environ if env is None else env, str(path))
    except ConfigError as exc:
        if exc.located:
            raise
        raise ConfigError(located(exc.errors, text, str(path))) from None


class _YamlLoader(yaml.SafeLoader):
    """YAML's safe loader, but a timestamp stays the text it was written as: the one field
    that takes a date (a key's ``expires``) reads it itself, with its path in any error,
    where PyYAML raised a bare ValueError on ``2026-02-30``."""


def _timestamp_as_text(loader: _YamlLoader, node: yaml.Node) -> str:
    assert isinstance(node, yaml.ScalarNode)  # a timestamp is a scalar
    return str(loader.construct_scalar(node))


_YamlLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_text)


def parse_config(text: str, env: Mapping[str, str], name: str = "") -> Config:
    try:
        raw = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, name) from None
    reader = _Reader(env, name)
    config = reader.config(raw)
    if reader.errors or config is None:
        raise ConfigError(reader.reported_errors() or ["the file is empty"])
    return config


class _Reader(FieldReader):
    """Walks the raw YAML tree, collecting every error instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str], source: str = ""):
        super().__init__(env)
        self.source = source  # the file's path: relative paths in it are beside it
        self.warnings: list[str] = []
        self.declared: set[str] = set()  # provider names in the file, valid or not
        self.retry = RetryPolicy()
        self.circuit = CircuitPolicy()

    def config(self, raw: Any) -> Config | None:
        if raw is None:
            return None
        top = self.mapping(raw, "(top)", TOP_KEYS)
        self.retry = replace(self.retry, **self.fields(top.get("retry"), "retry", RETRY_FIELDS))
        self.circuit = replace(
            self.circuit, **self.fields(top.get("circuit"), "circuit", CIRCUIT_FIELDS)
        )
        providers = self.providers(top.get("providers"))
        models = self.models(top.get("models"), providers)
        server = self.fields(top.get("server"), "server", SERVER_FIELDS)
        teams = read_teams(self, top.get("teams"), providers, set(models))
        self.warnings.extend(expired_keys(teams, time.time()))
        admin_key = self.string(top.get("admin_key", ""), "admin_key", allow_empty=True) or ""
        return Config(
            providers=providers,
            models=models,
            server=replace(ServerSettings(), **server),
            redis=read_redis(self, top.get("redis")),
            teams=teams,
            key_index=key_index(teams),
            accounting=read_accounting(self, top.get("accounting"), self.source),
            admin_key=admin_key,
            telemetry=read_telemetry(self, top.get("telemetry")),
            warnings=tuple(self.warnings),
        )

    def providers(self, raw: Any) -> dict[str, Provider]:
        out: dict[str, Provider] = {}
        declared = self.mapping(raw, "providers")
        self.declared = {str(name) for name in declared}
        for name, node in declared.items():
            provider = self.provider(str(name), node, f"providers.{name}")
            if provider is not None:
                out[str(name)] = provider
        if not out and not any(e.startswith("providers.") for e in self.errors):
            self.error("providers", "at least one provider is required")
        return out

    def provider(self, name: str, raw: Any, path: str) -> Provider | None:
        node = self.mapping(raw, path, PROVIDER_KEYS)
        engine = read_engine(self, node["engine"], f"{path}.engine") if "engine" in node else None
        endpoints = (
            self.engine_endpoint(node, engine, path)
            if "engine" in node
            else (self.endpoints(node, path))
        )
        # An engine's replicas went to the least busy before balance applied to them.
        default = "least_busy" if engine is not None else "round_robin"
        balance = self.choice(node.get("balance", default), f"{path}.balance", BALANCES)
        api_key, missing = self.api_key(node.get("api_key"), f"{path}.api_key")
        if missing:
            self.warnings.append(
                f"{path}.api_key: environment variable {missing} is not set; "
                f"requests routed to provider '{name}' will fail until it is"
            )
        timeouts = self.fields(node.get("timeouts"), f"{path}.timeouts", TIMEOUT_FIELDS)
        retry = self.fields(node.get("retry"), f"{path}.retry", RETRY_FIELDS)
        circuit = self.fields(node.get("circuit"), f"{path}.circuit", CIRCUIT_FIELDS)
        cache_aware = self.fields(
            node.get("cache_aware"), f"{path}.cache_aware", CACHE_AWARE_FIELDS
        )
        provider = Provider(
            name=name,
            endpoints=endpoints,
            api_key=api_key,
            missing_key_var=missing,
            headers=self.headers(node.get("headers"), f"{path}.headers"),
            timeouts=replace(Timeouts(), **timeouts),
            retry=replace(self.retry, **retry),
            circuit=replace(self.circuit, **circuit),
            balance=balance or default,
            cache_aware=replace(CacheAware(), **cache_aware),
            required=self.boolean(node.get("required", False), f"{path}.required"),
            stream_usage=self.boolean(node.get("stream_usage", True), f"{path}.stream_usage"),
            engine=engine,
            price=read_price(self, node["price"], f"{path}.price") if "price" in node else None,
        )
        return provider if endpoints else None

    def endpoints(self, node: dict[str, Any], path: str) -> tuple[Endpoint, ...]:
        """``base_url`` for one endpoint, or ``endpoints`` for replicas: exactly one of them."""
        if ("base_url" in node) == ("endpoints" in node):
            self.error(path, "needs exactly one of base_url or endpoints")
            return ()
        if "base_url" in node:
            url = self.url(node["base_url"], f"{path}.base_url")
            return (Endpoint(url),) if url else ()
        items = node["endpoints"]
        if not isinstance(items, list) or not items:
            self.error(f"{path}.endpoints", "must be a non-empty list of URLs or {url, weight}")
            return ()
        found = [self.endpoint(item, f"{path}.endpoints[{i}]") for i, item in enumerate(items)]
        valid = tuple(e for e in found if e is not None)
        return valid if len(valid) == len(found) else ()

    def endpoint(self, raw: Any, path: str) -> Endpoint | None:
        if not isinstance(raw, dict):
            url = self.url(raw, path)
            return Endpoint(url) if url else None
        node = self.mapping(raw, path, ENDPOINT_KEYS)
        url = self.url(node.get("url"), f"{path}.url")
        weight = self.weight(node.get("weight", 1), f"{path}.weight")
        return Endpoint(url, weight) if url and weight else None

    def engine_endpoint(
        self, node: dict[str, Any], engine: EngineSpec | None, path: str
    ) -> tuple[Endpoint, ...]:
        """An engine's URL is a template: the port comes from the replica a call leases."""
        for key in ("base_url", "endpoints"):
            if key in node:
                self.error(f"{path}.{key}", f"an engine's URL is chosen by the proxy: remove {key}")
        if engine is None:
            return ()
        return (Endpoint(f"http://{engine.host}:{{port}}{engine.api_path}"),)

    def api_key(self, raw: Any, path: str) -> tuple[str | None, str | None]:
        if raw is None:
            return None, None
        if not isinstance(raw, str):
            self.error(path, "must be a string such as ${PROVIDER_API_KEY}")
            return None, None
        value, missing = expand(raw, self.env)
        if missing:
            return None, missing[0]
        return value or None, None

    def headers(self, raw: Any, path: str) -> Mapping[str, str]:
        out: dict[str, str] = {}
        for key, value in self.mapping(raw or {}, path).items():
            text = self.string(value, f"{path}.{key}", allow_empty=True)
            if text is not None:
                out[str(key)] = text
        return frozen_map(out)

    def models(self, raw: Any, providers: Mapping[str, Provider]) -> dict[str, Model]:
        out: dict[str, Model] = {}
        for model_id, node in self.mapping(raw, "models").items():
            model = self.model(str(model_id), node, providers)
            if model is not None:
                out[str(model_id)] = model
        if not out and not any(e.startswith("models") for e in self.errors):
            self.error("models", "at least one model is required")
        return out

    def model(self, model_id: str, raw: Any, providers: Mapping[str, Provider]) -> Model | None:
        path = f"models.{model_id}"
        node = self.mapping(raw, path, MODEL_KEYS)
        strategy = self.choice(node.get("strategy", "fallback"), f"{path}.strategy", STRATEGIES)
        retry = self.fields(node.get("retry"), f"{path}.retry", RETRY_FIELDS)
        owned_by = self.string(node.get("owned_by", "system"), f"{path}.owned_by") or "system"
        cap = None
        if "max_tokens" in node:
            cap = self.output_cap(node["max_tokens"], f"{path}.max_tokens")
        targets_raw = node.get("targets")
        if not isinstance(targets_raw, list) or not targets_raw:
            self.error(f"{path}.targets", "must be a non-empty list of {provider, model}")
            return None
        targets = [
            self.target(item, f"{path}.targets[{i}]", providers)
            for i, item in enumerate(targets_raw)
        ]
        valid = tuple(t for t in targets if t is not None)
        if len(valid) != len(targets):
            return None
        return Model(
            id=model_id,
            targets=valid,
            strategy=strategy or "fallback",
            owned_by=owned_by,
            retry_overrides=frozen_map(retry),
            budget=retry.get("budget", self.retry.budget),
            max_tokens=cap,
            spill_after=(
                self.duration(node["spill_after"], f"{path}.spill_after")
                if "spill_after" in node
                else None
            ),
        )

    def output_cap(self, raw: Any, path: str) -> OutputCap | None:
        """``{default, limit, field}``: one or both counts, the default not above the limit."""
        errors = len(self.errors)
        node = self.mapping(raw, path, OUTPUT_CAP_KEYS)
        field = self.choice(node.get("field", "max_tokens"), f"{path}.field", MAX_TOKENS_FIELDS)
        default, limit = (self.cap_count(node, key, path) for key in ("default", "limit"))
        if isinstance(raw, dict) and "default" not in node and "limit" not in node:
            self.error(path, "needs a default, a limit or both")
        if default is not None and limit is not None and default > limit:
            self.error(f"{path}.default", f"{default} is above the limit, {limit}")
        if len(self.errors) > errors or field is None:
            return None
        # Only a limit: it is the default too, or a call that names no cap would get
        # whatever the upstream's own default is, past the limit.
        most = default if default is not None else limit
        assert most is not None
        return OutputCap(default=most, limit=limit, field=field)

    def cap_count(self, node: dict[str, Any], key: str, path: str) -> int | None:
        if key not in node:
            return None
        count = self.count(node[key], f"{path}.{key}")
        if count is not None and count > MAX_OUTPUT_CAP:
            self.error(f"{path}.{key}", f"must be at most {MAX_OUTPUT_CAP}, got {count}")
            return None
        return count

    def target(self, raw: Any, path: str, providers: Mapping[str, Provider]) -> Target | None:
        node = self.mapping(raw, path, TARGET_KEYS)
        provider = self.string(node.get("provider"), f"{path}.provider")
        model = self.string(node.get("model"), f"{path}.model")
        weight = self.weight(node.get("weight", 1), f"{path}.weight")
        price = read_price(self, node["price"], f"{path}.price") if "price" in node else None
        if provider is not None and provider not in providers:
            if provider not in self.declared:  # a declared but invalid one has its own error
                hint_text = hint(provider, self.declared)
                self.error(f"{path}.provider", f"unknown provider {provider!r}{hint_text}")
            return None
        if provider is None or model is None or weight is None:
            return None
        price = price or providers[provider].price  # the provider's is the default
        return Target(provider=provider, model=model, weight=weight, price=price)
