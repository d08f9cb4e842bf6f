"""A config's limits, compiled once per load into what admission needs per call.

For every team: the checks of its team-wide limits, and for each model with limits of
its own, those added. Each set is handed to the store once (``Store.prepare``), which
encodes what it will send for it, so a call costs one dict lookup here and encodes
only what is its own (docs/ARCHITECTURE.md, "Config as data").
"""

from __future__ import annotations

from dataclasses import asdict

from proxy.config.model import ANONYMOUS, Budget, Config, Limits, Team
from proxy.limits.store import BUDGETS, Check, Store, TeamChecks


def checks_of(scope: str, settings: Limits | Budget | None) -> tuple[Check, ...]:
    """The checks of one scope's limits or budget ("*": the team's; a model id: that
    model's). A budget's limit is in micro-dollars."""
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
            wide = checks_of("*", team.limits) + checks_of("*", team.budget)
            self._teams[name] = store.prepare(name, wide)
            for model in _models_with_own(team):
                checks = checks_of(model, team.model_limits.get(model))
                checks += checks_of(model, team.model_budgets.get(model))
                self._models[(name, model)] = store.prepare(name, wide + checks)

    def budgets(self, team: str) -> tuple[Check, ...]:
        """Every budget of ``team``: its own, then its models'."""
        found = self._teams.get(team)
        every = [found] if found else []
        every += [checks for (name, _), checks in self._models.items() if name == team]
        return tuple(dict.fromkeys(c for t in every for c in t.checks if c.kind in BUDGETS))

    def checks(self, team: str, model: str) -> TeamChecks:
        """What admission takes for a call of ``team`` to ``model``: a team that
        authentication admitted is always here (the configured ones and ANONYMOUS)."""
        found = self._models.get((team, model))
        return self._teams[team] if found is None else found


def _models_with_own(team: Team) -> list[str]:
    """The models with limits or a budget of their own, in the file's order."""
    return list(dict.fromkeys([*team.model_limits, *team.model_budgets]))
