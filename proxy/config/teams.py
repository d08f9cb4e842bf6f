"""The ``teams`` and ``redis`` sections of routes.yaml."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from fnmatch import fnmatchcase
from typing import Any

from proxy.config.budgets import read_budget
from proxy.config.fields import FieldReader, hint, known_list, shown
from proxy.config.model import (
    ANONYMOUS,
    LIMIT_KINDS,
    Limits,
    Provider,
    RedisSettings,
    Team,
    TeamKey,
    frozen_map,
)

TEAM_KEYS = {
    "keys", "models", "limits", "model_limits", "budget", "model_budgets", "headers",
    "client_headers", "weight",
}  # fmt: skip
KEY_FIELDS = {"name", "hash", "expires"}
KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
KEY_PREFIX = "sk-proxy-"  # of the keys keygen makes
# A key's name is written in the access log: a short word, nothing a key could be mistaken
# for. A bare hash is named by its first 12 hex digits ("sha256:1f0c…"), which no chosen
# name can be (no ':').
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # fullmatch
BARE_NAME_CHARS = len("sha256:") + 12
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")  # fullmatch
EXPIRY_FORMS = (
    "a date (2026-01-31: refused from 00:00 UTC that day) or a date and time with its "
    "UTC offset (2026-01-31T18:00:00+01:00, or Z for UTC)"
)
KEYS_NEEDED = (
    "must be a non-empty list of keys, each {name, hash, expires} or a bare "
    "'sha256:<hex>' hash (python -m proxy keygen TEAM --name NAME prints one)"
)
LIMIT_FIELDS = dict.fromkeys(LIMIT_KINDS, "count")
REDIS_FIELDS = {"lease_ttl": "duration", "timeout": "duration"}
REDIS_KEYS = {"url", "on_error", "ledger_replicas", *REDIS_FIELDS}

# Headers that choose which account, project or team of the provider a call is billed
# to. The proxy calls with its own key, so with teams configured a client must not pick
# them (one team could bill another's project), unless its team's client_headers allow it.
SCOPING_NAMES = ("OpenAI-Project", "OpenAI-Organization", "X-Prime-Team-ID")
SCOPING_HEADERS = frozenset(name.lower() for name in SCOPING_NAMES)


def read_teams(
    reader: FieldReader, raw: Any, providers: Mapping[str, Provider], models: Iterable[str]
) -> dict[str, Team]:
    teams: dict[str, Team] = {}
    owners: dict[str, tuple[str, int]] = {}
    for name, node in reader.mapping(raw or {}, "teams").items():
        path = f"teams.{name}"
        if name == ANONYMOUS:
            reader.error(path, f"'{ANONYMOUS}' is the name of calls without a team")
            continue
        team = _team(reader, str(name), node, path, providers, list(models))
        for i, key in enumerate(team.keys):
            if key.hash in owners:
                owner, at = owners[key.hash]
                also = f"keys[{at}]" if owner == str(name) else f"team {owner}'s"
                reader.error(f"{path}.keys[{i}]", f"the same key is also {also}")
            owners[key.hash] = (str(name), i)
        teams[str(name)] = team
    return teams


def _team(
    reader: FieldReader, name: str, raw: Any, path: str,
    providers: Mapping[str, Provider], models: list[str],
) -> Team:  # fmt: skip
    node = reader.mapping(raw, path, TEAM_KEYS)
    allowed = (
        _models(reader, node["models"], f"{path}.models", models) if "models" in node else None
    )

    def per_model(field: str, read: Callable[[FieldReader, Any, str], Any]) -> dict[str, Any]:
        return _per_model(reader, node.get(field), f"{path}.{field}", models, allowed, read)

    model_limits = per_model("model_limits", _limits)
    model_budgets = per_model("model_budgets", read_budget)
    return Team(
        name=name,
        keys=_keys(reader, name, node.get("keys"), f"{path}.keys"),
        models=allowed,
        limits=_limits(reader, node.get("limits"), f"{path}.limits"),
        model_limits=frozen_map(model_limits),
        budget=read_budget(reader, node.get("budget"), f"{path}.budget"),
        model_budgets=frozen_map(model_budgets),
        headers=_headers(reader, node.get("headers"), f"{path}.headers", providers),
        client_headers=_client_headers(reader, node.get("client_headers"), path),
        weight=reader.weight(node.get("weight", 1), f"{path}.weight") or 1.0,
    )


def _per_model(
    reader: FieldReader, raw: Any, path: str, models: list[str],
    allowed: frozenset[str] | None, read: Callable[[FieldReader, Any, str], Any],
) -> dict[str, Any]:  # fmt: skip
    """``model_limits`` or ``model_budgets``: per model id of the team's, ``read``'s block."""
    out = {}
    for model, block in reader.mapping(raw or {}, path).items():
        if model not in models:
            reader.error(f"{path}.{model}", f"unknown model{hint(str(model), set(models))}")
        elif allowed is not None and model not in allowed:
            reader.error(f"{path}.{model}", f"not one of {path.rsplit('.', 1)[0]}.models")
        out[str(model)] = read(reader, block, f"{path}.{model}")
    return out


def _keys(reader: FieldReader, team: str, raw: Any, path: str) -> tuple[TeamKey, ...]:
    if not isinstance(raw, list) or not raw:
        reader.error(path, KEYS_NEEDED)
        return ()
    keys: list[TeamKey] = []
    named: dict[str, int] = {}
    for i, item in enumerate(raw):
        key = _key(reader, team, item, f"{path}[{i}]")
        if key is None:
            continue
        if key.name in named:
            reader.error(
                f"{path}[{i}].name", f"{key.name!r} is also keys[{named[key.name]}]'s name"
            )
        named[key.name] = i
        keys.append(key)
    return tuple(keys)


def _key(reader: FieldReader, team: str, raw: Any, path: str) -> TeamKey | None:
    """One entry of ``keys``: ``{name, hash, expires?}``, or a bare hash. A value that is
    not a hash is never echoed: it may be the key itself."""
    if isinstance(raw, str):
        if not KEY_HASH.fullmatch(raw):
            reader.error(path, "must be 'sha256:' and 64 hex digits, not a key")
            return None
        return TeamKey(team, raw[:BARE_NAME_CHARS], raw)
    if not isinstance(raw, dict):
        reader.error(path, "must be {name, hash, expires} or a bare 'sha256:<hex>' hash")
        return None
    node = reader.mapping(raw, path, KEY_FIELDS)
    bad_name = key_name_problem(node.get("name"))
    if bad_name:
        reader.error(f"{path}.name", bad_name)
    digest = node.get("hash")
    good_hash = isinstance(digest, str) and KEY_HASH.fullmatch(digest) is not None
    if not good_hash:
        reader.error(f"{path}.hash", "must be 'sha256:' and 64 hex digits, not a key")
    expires = None
    if "expires" in node:
        try:
            expires = parse_expiry(node["expires"])
        except ValueError as exc:
            reader.error(f"{path}.expires", str(exc))
    if bad_name or not good_hash:
        return None
    return TeamKey(team, str(node["name"]), str(digest), expires)


def key_name_problem(name: Any) -> str | None:
    """What is wrong with a key's name (routes.yaml's, or keygen's --name), or None."""
    if name is None:
        return "is required: what the access log calls the key (laptop, ci, alice-2026)"
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if name.startswith(KEY_PREFIX):
        return "looks like a key: a key's name is logged, so it must not be the key"
    if not KEY_NAME.fullmatch(name):
        return (
            "must be 1 to 64 letters, digits and . _ @ -, starting with a letter or digit, "
            f"got {name!r}"
        )
    return None


def parse_expiry(raw: Any) -> float:
    """``expires`` (or keygen's --expires) as the Unix time from which the key is refused.

    A date means 00:00 UTC of that day: a key that ``expires: 2026-01-31`` works through
    January 30th, UTC. A date and time must carry its UTC offset; without one, which zone
    it meant is a guess, so it is refused. routes.yaml's loader leaves a timestamp as its
    text (config/load.py), so a date is read here, quoted or not."""
    value = raw
    if isinstance(raw, str):
        text = raw.strip()
        try:
            value = (
                date.fromisoformat(text) if _DATE.fullmatch(text) else datetime.fromisoformat(text)
            )
        except ValueError:
            raise ValueError(f"must be {EXPIRY_FORMS}, got {raw!r}") from None
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError(
                f"has no UTC offset: add one (Z for UTC, or such as +01:00), got {raw!r}"
            )
        return value.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    raise ValueError(f"must be {EXPIRY_FORMS}, got {raw!r}")


def expiry_text(expires: float) -> str:
    """An expiry as people read it, in UTC: ``2026-01-31T00:00:00Z``."""
    return datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z")


def expired_keys(teams: Mapping[str, Team], now: float) -> list[str]:
    """Warnings for the keys already expired when the file is read (refused with 401)."""
    return [
        f"teams.{team.name}.keys: key {key.name!r} expired at {expiry_text(key.expires)} "
        "and is refused; remove it once its clients have moved to another key"
        for team in teams.values()
        for key in team.keys
        if key.expires is not None and key.expires <= now
    ]


def _models(reader: FieldReader, raw: Any, path: str, models: list[str]) -> frozenset[str]:
    """The model ids a team's ``models`` patterns (globs, as fnmatch reads them, case
    counted) match. A pattern that matches no model is an error, as a typo would be."""
    if not isinstance(raw, list) or not raw:
        got = f", got {type(raw).__name__}" if not isinstance(raw, list) else ""
        reader.error(path, f"must be a non-empty list of model ids or glob patterns{got}")
        return frozenset()
    allowed: set[str] = set()
    for i, pattern in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(pattern, str) or not pattern:
            reader.error(where, f"must be a model id or a glob pattern, got {pattern!r}")
            continue
        problem = glob_problem(pattern)
        if problem:
            reader.error(where, problem)
            continue
        matched = [m for m in models if fnmatchcase(m, pattern)]
        if not matched:
            known = f" ({known_list(set(models))})" if _GLOB.search(pattern) else None
            reader.error(
                where, f"{pattern!r} matches no model{known or hint(pattern, set(models))}"
            )
        allowed.update(matched)
    return frozenset(allowed)


_GLOB = re.compile(r"[*?\[]")


def glob_problem(pattern: str) -> str | None:
    """A ``[`` that fnmatch would read as a plain character (no ``]`` closes it): surely
    not what was meant."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            close = pattern.find("]", j)
            if close < 0:
                return f"{pattern!r}: the '[' at {i} is never closed by ']'"
            i = close
        i += 1
    return None


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


def key_index(teams: Mapping[str, Team]) -> Mapping[str, TeamKey]:
    return frozen_map({key.hash: key for t in teams.values() for key in t.keys})
