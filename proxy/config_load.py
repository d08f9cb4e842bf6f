"""routes.yaml → ``Config``, validated as a whole: every error is reported with its YAML path."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.config import (
    STRATEGIES,
    Config,
    Model,
    Provider,
    ServerSettings,
    Target,
    Timeouts,
    frozen_map,
)
from proxy.engines.config_load import read_engine
from proxy.engines.spec import EngineSpec
from proxy.envsubst import expand

TOP_KEYS = {"redis", "server", "providers", "models"}
PROVIDER_KEYS = {"base_url", "api_key", "headers", "timeouts", "required", "engine"}
MODEL_KEYS = {"targets", "strategy", "owned_by"}
TARGET_KEYS = {"provider", "model"}
SERVER_KEYS = {"max_body_bytes", "reload_interval"}
REDIS_KEYS = {"url"}
TIMEOUT_KEYS = {"connect", "first_byte", "idle", "total"}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 10**6,
    "MiB": 2**20,
    "GB": 10**9,
    "GiB": 2**30,
}


class ConfigError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    return parse_config(text, os.environ if env is None else env)


def parse_config(text: str, env: Mapping[str, str]) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"yaml: {exc}"]) from None
    reader = _Reader(env)
    config = reader.config(raw)
    if reader.errors or config is None:
        raise ConfigError(reader.errors or ["the file is empty"])
    return config


class _Reader:
    """Walks the raw YAML tree, collecting every error instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.declared: set[str] = set()  # provider names in the file, valid or not

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def config(self, raw: Any) -> Config | None:
        if raw is None:
            return None
        top = self.mapping(raw, "(top)", TOP_KEYS)
        providers = self.providers(top.get("providers"))
        models = self.models(top.get("models"), providers)
        server = self.server(top.get("server"))
        redis = self.mapping(top.get("redis") or {}, "redis", REDIS_KEYS)
        redis_url = self.string(redis.get("url", ""), "redis.url", allow_empty=True) or ""
        return Config(
            providers=providers,
            models=models,
            server=server,
            redis_url=redis_url,
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
        base_url = self.provider_url(node, engine, path)
        api_key, missing = self.api_key(node.get("api_key"), f"{path}.api_key")
        if missing:
            self.warnings.append(
                f"{path}.api_key: environment variable {missing} is not set; "
                f"requests routed to provider '{name}' will fail until it is"
            )
        headers = self.headers(node.get("headers"), f"{path}.headers")
        timeouts = self.timeouts(node.get("timeouts"), f"{path}.timeouts")
        required = self.boolean(node.get("required", False), f"{path}.required")
        if base_url is None:
            return None
        return Provider(
            name=name,
            base_url=base_url,
            api_key=api_key,
            missing_key_var=missing,
            headers=headers,
            timeouts=timeouts,
            required=required,
            engine=engine,
        )

    def provider_url(
        self, node: dict[str, Any], engine: EngineSpec | None, path: str
    ) -> str | None:
        if "engine" not in node:
            return self.base_url(node.get("base_url"), f"{path}.base_url")
        if "base_url" in node:
            self.error(
                f"{path}.base_url", "an engine's URL is chosen by the proxy: remove base_url"
            )
        if engine is None:
            return None
        return f"http://{engine.host}:{{port}}{engine.api_path}"

    def base_url(self, raw: Any, path: str) -> str | None:
        url = self.string(raw, path)
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.error(path, f"must be an http(s) URL with a host, got {url!r}")
            return None
        if parts.query or parts.fragment:
            self.error(path, "must not have a query or fragment")
            return None
        return url

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

    def timeouts(self, raw: Any, path: str) -> Timeouts:
        node = self.mapping(raw or {}, path, TIMEOUT_KEYS)
        default = Timeouts()
        values = {
            key: self.duration(node[key], f"{path}.{key}") if key in node else None
            for key in TIMEOUT_KEYS
        }
        return Timeouts(**{k: getattr(default, k) if v is None else v for k, v in values.items()})

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
        strategy = self.string(node.get("strategy", "fallback"), f"{path}.strategy")
        if strategy is not None and strategy not in STRATEGIES:
            self.error(f"{path}.strategy", f"unknown strategy {strategy!r} ({_known(STRATEGIES)})")
        owned_by = self.string(node.get("owned_by", "system"), f"{path}.owned_by") or "system"
        targets_raw = node.get("targets")
        if not isinstance(targets_raw, list) or not targets_raw:
            self.error(f"{path}.targets", "must be a non-empty list of {provider, model}")
            return None
        targets = [
            self.target(item, f"{path}.targets[{i}]", providers)
            for i, item in enumerate(targets_raw)
        ]
        if any(t is None for t in targets):
            return None
        return Model(
            id=model_id,
            targets=tuple(t for t in targets if t is not None),
            strategy=strategy or "fallback",
            owned_by=owned_by,
        )

    def target(self, raw: Any, path: str, providers: Mapping[str, Provider]) -> Target | None:
        node = self.mapping(raw, path, TARGET_KEYS)
        provider = self.string(node.get("provider"), f"{path}.provider")
        model = self.string(node.get("model"), f"{path}.model")
        if provider is not None and provider not in providers:
            if provider not in self.declared:  # a declared but invalid one has its own error
                hint = _hint(provider, self.declared)
                self.error(f"{path}.provider", f"unknown provider {provider!r}{hint}")
            return None
        if provider is None or model is None:
            return None
        return Target(provider=provider, model=model)

    def server(self, raw: Any) -> ServerSettings:
        node = self.mapping(raw or {}, "server", SERVER_KEYS)
        default = ServerSettings()
        size = (
            self.size(node["max_body_bytes"], "server.max_body_bytes")
            if ("max_body_bytes" in node)
            else None
        )
        interval = (
            self.duration(node["reload_interval"], "server.reload_interval")
            if ("reload_interval" in node)
            else None
        )
        return ServerSettings(
            max_body_bytes=default.max_body_bytes if size is None else size,
            reload_interval=default.reload_interval if interval is None else interval,
        )

    # -- scalars ---------------------------------------------------------------------

    def mapping(self, raw: Any, path: str, allowed: set[str] | None = None) -> dict[str, Any]:
        if raw is None:
            self.error(path, "is required")
            return {}
        if not isinstance(raw, dict):
            self.error(path, f"must be a mapping, got {type(raw).__name__}")
            return {}
        for key in raw:
            if allowed is not None and key not in allowed:
                prefix = "" if path == "(top)" else f"{path}."
                self.error(f"{prefix}{key}", f"unknown key{_hint(str(key), allowed)}")
        return raw

    def string(self, raw: Any, path: str, allow_empty: bool = False) -> str | None:
        if raw is None:
            self.error(path, "is required")
            return None
        if not isinstance(raw, str | int | float) or isinstance(raw, bool):
            self.error(path, f"must be a string, got {type(raw).__name__}")
            return None
        value, missing = expand(str(raw), self.env)
        for name in missing:
            self.error(path, f"environment variable {name} is not set")
        if not value and not allow_empty:
            self.error(path, "must not be empty")
            return None
        return value

    def boolean(self, raw: Any, path: str) -> bool:
        if not isinstance(raw, bool):
            self.error(path, f"must be true or false, got {raw!r}")
            return False
        return raw

    def duration(self, raw: Any, path: str) -> float | None:
        if isinstance(raw, int | float) and not isinstance(raw, bool) and raw > 0:
            return float(raw)
        match = _DURATION.match(raw) if isinstance(raw, str) else None
        if match is None or float(match.group(1)) <= 0:
            self.error(path, f"must be a positive duration such as 30s, 500ms or 2m, got {raw!r}")
            return None
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]

    def size(self, raw: Any, path: str) -> int | None:
        match = _SIZE.match(str(raw)) if isinstance(raw, int | str) else None
        if match is None or int(match.group(1)) <= 0:
            self.error(path, f"must be a positive size such as 16MiB, got {raw!r}")
            return None
        return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _hint(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" ({_known(known)})"


def _known(known: Mapping[str, Any] | set[str] | tuple[str, ...]) -> str:
    return "known: " + ", ".join(sorted(known)) if known else "none defined"
