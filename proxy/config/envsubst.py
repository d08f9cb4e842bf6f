"""``${VAR}`` and ``${VAR:-default}`` in routes.yaml strings; ``$$`` is a literal ``$``."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

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


# Shorter values are left in messages: they are not secrets, and replacing them would
# garble the message ("1" in every number).
_SHORTEST_HIDDEN = 4


class RecordingEnv(Mapping[str, str]):
    """The environment, remembering each value a ``${VAR}`` took, so that an error message
    can show ``${VAR}`` again instead of what may be a secret."""

    def __init__(self, env: Mapping[str, str]):
        self._env = env
        self.used: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        value = self._env[name]
        self.used[name] = value
        return value

    def __contains__(self, name: object) -> bool:
        return name in self._env

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def unexpand(text: str, used: Mapping[str, str]) -> str:
    """``text`` with each value taken from the environment written as its ``${VAR}``
    again (longest first, also as ``repr`` escapes it)."""
    for name, value in sorted(used.items(), key=lambda item: -len(item[1])):
        if len(value) >= _SHORTEST_HIDDEN:
            for form in (value, repr(value)[1:-1]):
                text = text.replace(form, "${" + name + "}")
    return text
