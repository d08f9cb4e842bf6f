"""``${VAR}`` and ``${VAR:-default}`` in routes.yaml strings; ``$$`` is a literal ``$``."""

from __future__ import annotations

import re
from collections.abc import Mapping

_PATTERN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Return the expanded text and the names of unset variables that had no default."""
    missing: list[str] = []

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and (default is None or env[name] != ""):
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    return _PATTERN.sub(one, text), missing
