"""Reading typed scalars and small blocks out of raw YAML, collecting errors by path."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from proxy.config.envsubst import RecordingEnv, expand, unexpand

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 10**6, "MiB": 2**20,
    "GB": 10**9, "GiB": 2**30,
}  # fmt: skip


class FieldReader:
    """Each method returns the parsed value, or None after recording an error at ``path``."""

    def __init__(self, env: Mapping[str, str]):
        self.env = RecordingEnv(env)
        self.errors: list[str] = []

    def reported_errors(self) -> list[str]:
        """The errors as they may be printed and logged: no value from the environment
        (a key, a password in a URL) in them, only the ``${VAR}`` it came from."""
        return [unexpand(error, self.env.used) for error in self.errors]

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def fields(self, raw: Any, path: str, kinds: Mapping[str, str]) -> dict[str, Any]:
        """The valid fields a block sets, each parsed by its kind; errors for the rest."""
        node = self.mapping(raw or {}, path, set(kinds))
        parsers = {
            "duration": self.duration,
            "size": self.size,
            "count": self.count,
            "boolean": self.boolean,
            "number": self.weight,
        }
        parsed = {k: parsers[kinds[k]](v, f"{path}.{k}") for k, v in node.items() if k in kinds}
        return {key: value for key, value in parsed.items() if value is not None}

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
                self.error(f"{prefix}{key}", f"unknown key{hint(str(key), allowed)}")
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

    def url(self, raw: Any, path: str) -> str | None:
        url = self.string(raw, path)
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            self.error(path, "is not a valid URL (check the host and the port)")
            return None
        if "@" in parts.netloc:
            # Never sent (the upstream clients drop userinfo), and never echoed.
            self.error(path, "credentials in the URL are not allowed; use api_key or headers")
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.error(path, f"must be an http(s) URL with a host, got {shown(url)}")
            return None
        if parts.query or parts.fragment:
            self.error(path, "must not have a query or fragment")
            return None
        return url

    def choice(self, raw: Any, path: str, known: tuple[str, ...]) -> str | None:
        value = self.string(raw, path)
        if value is not None and value not in known:
            self.error(path, f"unknown {path.rsplit('.', 1)[-1]} {value!r} ({known_list(known)})")
            return None
        return value

    def boolean(self, raw: Any, path: str) -> bool:
        if not isinstance(raw, bool):
            self.error(path, f"must be true or false, got {raw!r}")
            return False
        return raw

    def count(self, raw: Any, path: str) -> int | None:
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
            self.error(path, f"must be a whole number of at least 1, got {raw!r}")
            return None
        return raw

    def weight(self, raw: Any, path: str) -> float | None:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 0:
            self.error(path, f"must be a positive number, got {raw!r}")
            return None
        return float(raw)

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


def shown(url: str) -> str:
    """A URL for an error message, unless it may hold credentials (``user:pass@``)."""
    return "(not shown: it has an '@')" if "@" in url else repr(url)


def hint(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" ({known_list(known)})"


def known_list(known: set[str] | tuple[str, ...]) -> str:
    return "known: " + ", ".join(sorted(known)) if known else "none defined"
