"""A config's limits, compiled once per load into what admission needs per call.

For every team: the checks of its team-wide limits, and for each model with limits of
its own, those added. Each set is handed to the store once (``Store.prepare``), which
encodes what it will send for it, so a call costs one dict lookup here and encodes
only what is its own (docs/ARCHITECTURE.md, "Config as data").
"""

from __future__ import annotations

from dataclasses import asdict

from proxy.config.model import ANONYMOUS, Config, Limits
from proxy.limits.store import Check, Store, TeamChecks


def checks_of(scope: str, settings: Limits | None) -> tuple[Check, ...]:
    """The checks of one scope's limits ("*": the team's; a model id: that model's)."""
    if settings is None:
        return ()
    return tuple(
        Check(scope, kind, value) for kind, value in asdict(settings).items() if value is not None
    )


class LimitPlan:
    """The limits of every team and model of one config, prepared by one store."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self._teams: dict[str, TeamChecks] = {ANONYMOUS: store.prepare(ANONYMOUS, ())}
        self._models: dict[tuple[str, str], TeamChecks] = {}
        for name, team in config.teams.items():
            wide = checks_of("*", team.limits)
            self._teams[name] = store.prepare(name, wide)
            for model, settings in team.model_limits.items():
                checks = wide + checks_of(model, settings)
                self._models[(name, model)] = store.prepare(name, checks)

    def checks(self, team: str, model: str) -> TeamChecks:
        """What admission takes for a call of ``team`` to ``model``: a team that
        authentication admitted is always here (the configured ones and ANONYMOUS)."""
        found = self._models.get((team, model))
        return self._teams[team] if found is None else found
