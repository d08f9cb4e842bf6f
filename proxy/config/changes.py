"""What a reload changed, in one line: the models, providers and teams added, removed
and changed (``models +a -b ~c; providers ~p; teams: no change``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config.model import Config

_PARTS = ("models", "providers", "teams")
_OTHERS = ("server", "redis", "accounting", "admin_key", "telemetry")


def describe_changes(old: Config, new: Config) -> str:
    parts = [_part(name, getattr(old, name), getattr(new, name)) for name in _PARTS]
    changed = [part for part in parts if part]
    others = [n for n in _OTHERS if _differs(old, new, n)]
    if others:
        changed.append("changed: " + ", ".join(others))
    return "; ".join(changed) or "no change"


def _part(name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    words = [f"+{k}" for k in added] + [f"-{k}" for k in removed] + [f"~{k}" for k in changed]
    return f"{name} {' '.join(words)}" if words else ""


def _differs(old: Config, new: Config, name: str) -> bool:
    return bool(getattr(old, name) != getattr(new, name))
