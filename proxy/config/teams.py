"""The ``teams``, ``redis`` and ``accounting`` sections of routes.yaml."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from proxy.config.fields import FieldReader, hint, shown
from proxy.config.model import (
    ANONYMOUS,
    LIMIT_KINDS,
    Accounting,
    Limits,
    Provider,
    RedisSettings,
    Team,
    frozen_map,
)

TEAM_KEYS = {"keys", "limits", "model_limits", "headers", "client_headers"}
KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
LIMIT_FIELDS = dict.fromkeys(LIMIT_KINDS, "count")
REDIS_FIELDS = {"lease_ttl": "duration", "timeout": "duration"}
REDIS_KEYS = {"url", "on_error", "ledger_replicas", *REDIS_FIELDS}
ACCOUNTING_FIELDS = {"default_max_tokens": "count"}

# Headers that choose which account, project or team of the provider a call is billed
# to. The proxy calls with its own key, so with teams configured a client must not pick
# them (one team could bill another's project), unless its team's client_headers allow it.
SCOPING_NAMES = ("OpenAI-Project", "OpenAI-Organization", "X-Prime-Team-ID")
SCOPING_HEADERS = frozenset(name.lower() for name in SCOPING_NAMES)


def read_teams(
    reader: FieldReader, raw: Any, providers: Mapping[str, Provider], models: set[str]
) -> dict[str, Team]:
    teams: dict[str, Team] = {}
    owners: dict[str, str] = {}
    for name, node in reader.mapping(raw or {}, "teams").items():
        path = f"teams.{name}"
        if name == ANONYMOUS:
            reader.error(path, f"'{ANONYMOUS}' is the name of calls without a team")
            continue
        team = _team(reader, str(name), node, path, providers, models)
        for i, digest in enumerate(team.key_hashes):
            if digest in owners:
                reader.error(f"{path}.keys[{i}]", f"the same key is also team {owners[digest]}'s")
            owners[digest] = str(name)
        teams[str(name)] = team
    return teams


def _team(
    reader: FieldReader, name: str, raw: Any, path: str,
    providers: Mapping[str, Provider], models: set[str],
) -> Team:  # fmt: skip
    node = reader.mapping(raw, path, TEAM_KEYS)
    keys = node.get("keys", [])
    if not isinstance(keys, list) or not keys:
        reader.error(
            f"{path}.keys",
            "must be a non-empty list of 'sha256:<hex>' key hashes "
            "(python -m proxy keygen TEAM prints one)",
        )
        keys = []
    for i, digest in enumerate(keys):
        if not isinstance(digest, str) or not KEY_HASH.match(digest):
            reader.error(f"{path}.keys[{i}]", "must be 'sha256:' and 64 hex digits, not a key")
    model_limits = {}
    for model, limits in reader.mapping(
        node.get("model_limits") or {}, f"{path}.model_limits"
    ).items():
        if model not in models:
            reader.error(f"{path}.model_limits.{model}", f"unknown model{hint(str(model), models)}")
        model_limits[str(model)] = _limits(reader, limits, f"{path}.model_limits.{model}")
    return Team(
        name=name,
        key_hashes=tuple(k for k in keys if isinstance(k, str)),
        limits=_limits(reader, node.get("limits"), f"{path}.limits"),
        model_limits=frozen_map(model_limits),
        headers=_headers(reader, node.get("headers"), f"{path}.headers", providers),
        client_headers=_client_headers(reader, node.get("client_headers"), path),
    )


def _limits(reader: FieldReader, raw: Any, path: str) -> Limits:
    return replace(Limits(), **reader.fields(raw, path, LIMIT_FIELDS))


def _headers(
    reader: FieldReader, raw: Any, path: str, providers: Mapping[str, Provider]
) -> Mapping[str, Mapping[str, str]]:
    out: dict[str, Mapping[str, str]] = {}
    for provider, headers in reader.mapping(raw or {}, path).items():
        if provider not in providers:
            hint_text = hint(str(provider), set(providers))
            reader.error(f"{path}.{provider}", f"unknown provider{hint_text}")
        values: dict[str, str] = {}
        for key, value in reader.mapping(headers, f"{path}.{provider}").items():
            text = reader.string(value, f"{path}.{provider}.{key}", allow_empty=True)
            if text is not None:
                values[str(key)] = text
        out[str(provider)] = frozen_map(values)
    return frozen_map(out)


def _client_headers(reader: FieldReader, raw: Any, team_path: str) -> frozenset[str]:
    """The provider-scoping headers this team's clients may send themselves."""
    path = f"{team_path}.client_headers"
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        reader.error(path, f"must be a list of header names, got {type(raw).__name__}")
        return frozenset()
    allowed: set[str] = set()
    for i, name in enumerate(raw):
        if not isinstance(name, str) or name.lower() not in SCOPING_HEADERS:
            known = hint(str(name), set(SCOPING_NAMES))
            reader.error(f"{path}[{i}]", f"not a provider-scoping header: {name!r}{known}")
            continue
        allowed.add(name.lower())
    return frozenset(allowed)


def read_redis(reader: FieldReader, raw: Any) -> RedisSettings:
    node = reader.mapping(raw or {}, "redis", REDIS_KEYS)
    durations = {k: v for k, v in node.items() if k in REDIS_FIELDS}
    fields = reader.fields(durations, "redis", REDIS_FIELDS)
    urls = _redis_urls(reader, node.get("url", ""))
    on_error = (
        reader.choice(
            node.get("on_error", "fail_open"), "redis.on_error", ("fail_open", "fail_closed")
        )
        or "fail_open"
    )
    replicas = node.get("ledger_replicas", 0)
    if replicas != 0 or isinstance(replicas, bool):  # 0, the default, is off
        replicas = reader.count(replicas, "redis.ledger_replicas") or 0
    settings = RedisSettings(urls=urls, on_error=on_error, ledger_replicas=replicas)
    return replace(settings, **fields)


_SEED_SCHEMES = ("redis://", "rediss://")
# One URL names the whole deployment (rediss+sentinel://: TLS to sentinels and nodes).
_ALONE_SCHEMES = ("unix://", "redis+sentinel://", "rediss+sentinel://")


def _redis_urls(reader: FieldReader, raw: Any) -> tuple[str, ...]:
    """``redis.url``: one URL, or a list of a Cluster's seed nodes."""
    listed = isinstance(raw, list)
    urls = []
    for i, item in enumerate(raw if listed else [raw]):
        path = f"redis.url[{i}]" if listed else "redis.url"
        url = reader.string(item, path, allow_empty=not listed) or ""
        if url and not url.startswith(_SEED_SCHEMES + _ALONE_SCHEMES):
            schemes = "redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel://"
            reader.error(path, f"must start with {schemes}, got {shown(url)}")
        elif url.startswith(_ALONE_SCHEMES) and listed and len(raw) > 1:
            reader.error(
                path, f"{url.split(':', 1)[0]}:// names the whole deployment: list no other URL"
            )
        if url:
            urls.append(url)
    return tuple(urls)


def read_accounting(reader: FieldReader, raw: Any) -> Accounting:
    return replace(Accounting(), **reader.fields(raw, "accounting", ACCOUNTING_FIELDS))


def key_index(teams: Mapping[str, Team]) -> Mapping[str, str]:
    return frozen_map({digest: t.name for t in teams.values() for digest in t.key_hashes})
