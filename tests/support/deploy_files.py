"""What deploy/ holds, read as data: the dashboard's queries and the alert expressions."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llm-proxy.json"
ALERTS = DEPLOY / "alerts.yml"
ALL = ".*"  # what a dashboard variable set to All stands for (its allValue)

# Words of PromQL that are not series names (functions, aggregations, keywords).
_PROMQL_WORDS = frozenset(
    ("sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
     "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
     "bool", "offset", "clamp_min", "abs", "vector", "absent")
)  # fmt: skip
_GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\([^)]*\)")


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    expr: str


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_queries() -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def grafana_to_promql(
    expr: str, rate_interval: str = "1m", chosen: Mapping[str, str] | None = None
) -> str:
    """Grafana fills in its $__ variables, and the dashboard's own ($team, $model,
    $provider: a regex, ".*" for All, as their allValue says), before the query
    reaches Prometheus."""
    expr = re.sub(r"\$__(rate_interval|interval|range)", rate_interval, expr)
    values = chosen or {}
    return re.sub(r"\$(\w+)", lambda m: values.get(m.group(1), ALL), expr)


def template_variables() -> dict[str, dict[str, Any]]:
    """The dashboard's variables by name."""
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def series_names(expr: str) -> set[str]:
    """The series an expression reads: identifiers outside labels, ranges and grouping."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = _GROUPING.sub("", text)
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return words - _PROMQL_WORDS


def proxy_job(prometheus_config: Path) -> str:
    """The job that scrapes the proxy in a Prometheus config of deploy/."""
    config = yaml_documents(prometheus_config)[0]
    [job] = [c["job_name"] for c in config["scrape_configs"] if "proxy" in c["job_name"]]
    name: str = job
    return name


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
