"""deploy/ parses, passes promtool, and names only series the proxy exports.

Docker and Kubernetes do not run here, so the files are checked as data: every YAML
and JSON file parses, the manifests say what the README promises (replicas sharing
Redis, routes.yaml from a ConfigMap, keys from a Secret, probes), and the ConfigMap's
routes.yaml is a valid config.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy.config.load import load_config
from proxy.observe.metrics import Metrics
from tests.support.deploy_files import (
    ALERTS,
    DEPLOY,
    alert_rules,
    dashboard,
    panel_queries,
    series_names,
    yaml_documents,
)
from tests.support.prometheus import binary

K8S = DEPLOY / "k8s"
# Series that Prometheus makes itself, not the proxy.
PROMETHEUS_OWN = frozenset({"up"})


def test_every_deploy_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.y*ml")) + sorted(DEPLOY.rglob("*.json"))
    assert len(files) >= 10
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert yaml_documents(path), path


@pytest.mark.parametrize("args", [["check", "config"], ["check", "rules"]], ids=["config", "rules"])
def test_promtool(args: list[str]) -> None:
    target = DEPLOY / "prometheus.yml" if args[1] == "config" else ALERTS
    result = subprocess.run(
        [binary("promtool"), *args, str(target)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_alerts_name_only_exported_series() -> None:
    exported = Metrics().series_names()
    for query in panel_queries():
        unknown = series_names(query.expr) - exported
        assert not unknown, (
            f"panel {query.panel!r} reads {unknown}, which the proxy does not export"
        )
    for rule in alert_rules():
        unknown = series_names(rule["expr"]) - exported - PROMETHEUS_OWN
        assert not unknown, f"alert {rule['alert']} reads {unknown}"


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    uid = yaml_documents(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]
    assert uid["datasources"][0]["uid"] == "prometheus"
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus"
        assert panel["targets"], panel["title"]
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])


def test_compose_runs_the_whole_stack() -> None:
    compose = yaml_documents(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    assert set(services) == {"proxy", "redis", "prometheus", "grafana"}
    assert services["proxy"]["environment"]["REDIS_URL"].startswith("redis://redis:")
    for mount in services["grafana"]["volumes"] + services["prometheus"]["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (DEPLOY / source).exists(), source


def _k8s(kind: str) -> dict[str, Any]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml_documents(p)]
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith("llm")]
    assert len(found) == 1, kind
    first: dict[str, Any] = found[0]
    return first


def test_kubernetes_deployment_shares_redis_and_mounts_config_and_keys() -> None:
    deployment = _k8s("Deployment")
    assert deployment["spec"]["replicas"] > 1
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["REDIS_URL"].startswith("redis://")
    assert container["envFrom"] == [{"secretRef": {"name": "llm-proxy-keys"}}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "routes")
    # subPath mounts never see ConfigMap updates; a directory mount does (symlink swap).
    assert "subPath" not in mount and mount["mountPath"] == "/etc/proxy"
    volume = next(v for v in pod["volumes"] if v["name"] == "routes")
    assert volume["configMap"]["name"] == _k8s("ConfigMap")["metadata"]["name"]
    assert _k8s("Service")["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    kustomized = yaml_documents(K8S / "kustomization.yaml")[0]["resources"]
    assert "secret.example.yaml" not in kustomized  # the real Secret is never in the repo


def test_configmap_routes_yaml_is_a_valid_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    path = tmp_path / "routes.yaml"
    path.write_text(_k8s("ConfigMap")["data"]["routes.yaml"])
    config = load_config(path)
    assert config.redis.urls == ("redis://redis:6379/0",)
    assert config.models
