"""deploy/ parses, passes promtool, names only series the proxy exports, and its files
agree with each other.

Docker and Kubernetes do not run here, so the files are checked as data: every YAML
and JSON file parses, the manifests say what docs/deploy.md promises (replicas sharing a
password-protected Redis, routes.yaml from a ConfigMap, keys from a Secret that
kustomize makes, probes), the image and compose agree on ports, paths and variables,
the image's own routes.yaml is a valid config that needs no ``[local]`` extra, and
deploy/constraints.txt pins every runtime dependency.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proxy.config.exposure import Exposure
from proxy.config.load import load_config
from proxy.engines.metrics_export import ReplicaStatus, engine_status_text
from proxy.observe.metrics import Metrics
from tests.support import ROOT
from tests.support.deploy_files import (
    ALERTS,
    DEPLOY,
    alert_rules,
    dashboard,
    panel_queries,
    proxy_job,
    series_names,
    template_variables,
    yaml_documents,
)
from tests.support.markdown import github_anchors
from tests.support.prometheus import binary

K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
CONSTRAINTS = DEPLOY / "constraints.txt"
RUNBOOKS = ROOT / "docs" / "operations.md"
PROMETHEUS_CONFIGS = (DEPLOY / "prometheus.yml", DEPLOY / "prometheus-k8s.yml")
# Series that Prometheus makes itself, not the proxy.
PROMETHEUS_OWN = frozenset({"up"})
# llama.cpp's own series, which the proxy relays with engine labels; the real
# Prometheus test (tests/observe/test_prometheus.py) shows them coming from llama.cpp.
ENGINE_OWN_PREFIX = "llamacpp:"


def test_every_deploy_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.y*ml")) + sorted(DEPLOY.rglob("*.json"))
    assert len(files) >= 14
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert yaml_documents(path), path


def _promtool(*args: str) -> None:
    result = subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_passes_the_compose_config_and_the_rules() -> None:
    _promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    _promtool("check", "rules", str(ALERTS))


def test_promtool_passes_the_kubernetes_config(tmp_path: Path) -> None:
    """Debian's Prometheus is built without Kubernetes discovery, so its promtool refuses
    ``kubernetes_sd_configs``; everything else (relabelling, rule files) is checked on
    a copy that lists a static target instead."""
    config = yaml_documents(DEPLOY / "prometheus-k8s.yml")[0]
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["10.0.0.1:8080"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    _promtool("check", "config", str(tmp_path / "prometheus.yml"))


def _exported_engine_series() -> set[str]:
    """What the proxy exports about its engines, from the function that writes it."""
    row = ReplicaStatus("local", 0, "ready", 0, 1, 0, 0, 0, 1.0)
    text = engine_status_text([("0", row)])
    return {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}


def test_dashboard_and_alerts_name_only_exported_series() -> None:
    exported = Metrics().series_names() | _exported_engine_series()
    for query in panel_queries():
        unknown = {
            s for s in series_names(query.expr) - exported if not s.startswith(ENGINE_OWN_PREFIX)
        }
        assert not unknown, (
            f"panel {query.panel!r} reads {unknown}, which the proxy does not export"
        )
    for rule in alert_rules():
        unknown = series_names(rule["expr"]) - exported - PROMETHEUS_OWN
        assert not unknown, f"alert {rule['alert']} reads {unknown}"


def test_dashboard_takes_its_datasource_and_filters_from_variables() -> None:
    provisioned = yaml_documents(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]
    assert provisioned["datasources"][0]["type"] == "prometheus"
    assert provisioned["datasources"][0]["isDefault"] is True  # what DS_PROMETHEUS picks
    variables = template_variables()
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])
    exprs = " ".join(q.expr for q in panel_queries())
    # A provider's values come from its attempts: one that fails every attempt (or
    # only ever falls back) never appears in requests_total's provider label.
    sources = {
        "team": "llm_proxy_requests_total",
        "model": "llm_proxy_requests_total",
        "provider": "llm_proxy_upstream_attempts_total",
    }
    for name, series in sources.items():
        variable = variables[name]
        assert variable["includeAll"] and variable["multi"], name
        assert variable["allValue"] == ".*", name  # All must match every value, even none
        assert variable["query"]["query"] == f"label_values({series}, {name})"
        assert f'=~"${name}"' in exprs, f"no panel is filtered by ${name}"


def _panel(title: str) -> dict[str, Any]:
    panels: list[dict[str, Any]] = [p for p in dashboard()["panels"] if p["title"] == title]
    [panel] = panels
    return panel


def _mapped(panel: dict[str, Any]) -> dict[str, str]:
    [mapping] = panel["fieldConfig"]["defaults"]["mappings"]
    return {str(value): str(shown["text"]) for value, shown in mapping["options"].items()}


def test_circuit_and_health_panels_show_words_not_numbers() -> None:
    metrics = Metrics()
    shown = {}
    for state in ("closed", "half_open", "open"):
        metrics.circuit_changed("p", "http://e", state)
        value = metrics.registry.get_sample_value(
            "llm_proxy_circuit_state", {"provider": "p", "endpoint": "http://e"}
        )
        shown[state] = _mapped(_panel("Circuit state"))[f"{value:g}"]
    assert shown == {"closed": "closed", "half_open": "half-open", "open": "open"}
    assert _mapped(_panel("Endpoint health")) == {"0": "down", "1": "up"}
    assert _mapped(_panel("Engine replicas up")) == {"0": "not ready", "1": "ready"}


def test_alerts_match_the_proxy_job_of_compose_and_kubernetes() -> None:
    jobs = {proxy_job(path) for path in PROMETHEUS_CONFIGS}
    assert jobs == {"llm-proxy"}, jobs
    named = {m for rule in alert_rules() for m in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert named == jobs
    absent = [r for r in alert_rules() if r["expr"].startswith("absent(up{")]
    assert [r["alert"] for r in absent] == ["LLMProxyAbsent"]
    assert absent[0]["labels"]["severity"] == "critical"
    for path in PROMETHEUS_CONFIGS:
        assert yaml_documents(path)[0]["rule_files"] == [ALERTS.name], path


def test_every_alert_has_a_runbook_section() -> None:
    anchors = github_anchors(RUNBOOKS.read_text())
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in {path}"
        assert anchor == rule["alert"].lower()  # the section is titled by the alert


def test_alertmanager_receives_what_prometheus_sends() -> None:
    config = yaml_documents(DEPLOY / "alertmanager.yml")[0]
    receivers = {r["name"] for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    assert {r.get("receiver", config["route"]["receiver"]) for r in config["route"]["routes"]} <= (
        receivers
    )
    services = _compose()["services"]
    alertmanager = services["alertmanager"]
    [target] = yaml_documents(DEPLOY / "prometheus.yml")[0]["alerting"]["alertmanagers"][0][
        "static_configs"
    ][0]["targets"]
    assert target == "alertmanager:9093"
    assert "9093:9093" in alertmanager["ports"]
    mounted = _mounts(alertmanager)
    config_flag = next(a for a in alertmanager["command"] if a.startswith("--config.file="))
    assert mounted[config_flag.partition("=")[2]] == "./alertmanager.yml"


def test_amtool_passes_the_alertmanager_config() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:  # .ci/run installs it; elsewhere the YAML checks above still run
        pytest.skip("!!! amtool is not installed (apt-get install prometheus-alertmanager) !!!")
    result = subprocess.run(
        [amtool, "check-config", str(DEPLOY / "alertmanager.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml_documents(COMPOSE)[0]
    return compose


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's bind mounts: container path -> source."""
    pairs = [m.split(":")[:2] for m in service.get("volumes", [])]
    return {target: source for source, target in pairs}


def _required_variable(value: str) -> str:
    """The name in ``${NAME:?why}``: compose refuses to start without it."""
    match = re.search(r"\$\{(\w+):\?[^}]+\}", value)
    assert match, f"{value!r} does not require its variable"
    return match.group(1)


def test_compose_runs_the_whole_stack() -> None:
    services = _compose()["services"]
    assert set(services) == {"proxy", "redis", "prometheus", "alertmanager", "grafana"}
    for service in services.values():
        for target, source in _mounts(service).items():
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
            assert not source.startswith("../"), f"{target}: mount from deploy/ only"


def test_compose_keeps_its_secrets_in_the_environment() -> None:
    services = _compose()["services"]
    proxy, redis = services["proxy"]["environment"], services["redis"]
    password = _required_variable(proxy["REDIS_URL"])
    assert re.fullmatch(r"redis://:\$\{\w+:\?[^}]+\}@redis:6379/0", proxy["REDIS_URL"])
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert _required_variable(command[command.index("--requirepass") + 1]) == password
    assert _required_variable(redis["environment"]["REDISCLI_AUTH"]) == password
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert _required_variable(proxy["PROXY_ADMIN_KEY"]) == "PROXY_ADMIN_KEY"
    # Every variable the image's routes.yaml reads is set for the proxy.
    read = set(re.findall(r"\$\{(\w+)", (DEPLOY / "config" / "routes.yaml").read_text()))
    assert read == set(proxy), read ^ set(proxy)
    grafana = services["grafana"]["environment"]
    assert _required_variable(grafana["GF_SECURITY_ADMIN_PASSWORD"]) == "GRAFANA_ADMIN_PASSWORD"
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert _is_ignored(DEPLOY / ".env"), "compose's .env must be ignored by git"


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in lines]


def _instruction(name: str) -> list[str]:
    return [args for instruction, args in _dockerfile() if instruction == name]


def _copies() -> dict[str, str]:
    """Where each COPY puts each of its sources: source -> destination in the image."""
    copies: dict[str, str] = {}
    for args in _instruction("COPY"):
        *sources, dest = args.split()
        copies |= {source: dest for source in sources}
    return copies


def _copied_to(dest: str) -> str:
    [source] = [s for s, d in _copies().items() if d == dest]
    return source


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_dockerfile_pins_its_base_and_dependencies() -> None:
    [base] = _instruction("FROM")
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base), base
    [install] = [r for r in _instruction("RUN") if "pip install" in r]
    constraint = install.split("--constraint ")[1].split()[0]
    assert _copied_to(constraint) == "deploy/constraints.txt"


def test_dockerfile_is_non_root_checked_and_never_anonymous() -> None:
    [user] = _instruction("USER")
    assert user.isdigit() and int(user) > 0
    # The user it adds must be new to a Debian base: Debian's base-passwd already has a
    # "proxy" (uid 13), and useradd of an existing name fails the build.
    [install] = [r for r in _instruction("RUN") if "useradd" in r]
    added = install.split("useradd ", 1)[1].split("&&")[0].split()
    assert _flag(added, "--uid") == user
    name = added[-1]
    debian = Path("/usr/share/base-passwd/passwd.master")
    names = (
        {line.split(":")[0] for line in debian.read_text().splitlines()}
        if debian.exists()
        else {"proxy"}
    )
    assert name not in names, f"{name} is already a user of Debian's base image"
    [healthcheck] = _instruction("HEALTHCHECK")
    [cmd] = _instruction("CMD")
    command = json.loads(cmd)
    assert "--allow-anonymous" not in command
    port = _flag(command, "--port")
    assert f"http://127.0.0.1:{port}/healthz" in healthcheck
    assert _instruction("EXPOSE") == [port]
    compose = _compose()["services"]["proxy"]
    assert "--allow-anonymous" not in compose["command"]
    assert _flag(compose["command"], "--port") == port
    assert compose["ports"] == [f"{port}:{port}"]
    # The config the image runs is where compose mounts its directory.
    config = _flag(command, "--config")
    assert _flag(compose["command"], "--config") == config
    assert _mounts(compose)[str(Path(config).parent)] == "./config"


def test_dockerignore_lets_in_what_the_image_copies_and_nothing_secret() -> None:
    """BuildKit reads deploy/Dockerfile.dockerignore for deploy/Dockerfile: everything
    is excluded (``*``) but the exceptions listed."""
    lines = [
        line
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = {source.rstrip("/") for source in _copies()}
    assert sources == allowed
    assert not any(".env" in path or "keys" in path for path in allowed)


def test_image_config_needs_no_local_extra_and_serves_only_teams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config_path = _flag(json.loads(_instruction("CMD")[0]), "--config")
    source = ROOT / _copied_to(config_path)
    assert source == DEPLOY / "config" / "routes.yaml"
    monkeypatch.setenv("PROXY_ADMIN_KEY", "admin-key-from-the-environment")
    monkeypatch.setenv("REDIS_URL", "redis://:pw@redis:6379/0")
    config = load_config(source)
    engines = [name for name, p in config.providers.items() if p.engine is not None]
    assert engines == [], f"{engines} cannot start in an image without the [local] extra"
    assert config.admin_key == "admin-key-from-the-environment"
    assert config.redis.urls == ("redis://:pw@redis:6379/0",)
    assert Exposure("0.0.0.0", allow_anonymous=False).problem(config) is None
    assert config.teams


def test_image_keeps_the_embedded_ledger_on_a_volume_its_user_owns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without Redis, the ledger's file goes to PROXY_STATE_DIR (the config directory is
    mounted read-only): a volume, made writable for the image's user."""
    [env] = [e for e in _instruction("ENV") if e.startswith("PROXY_STATE_DIR=")]
    state = env.split("=", 1)[1]
    assert json.loads(_instruction("VOLUME")[0]) == [state]
    [user] = _instruction("USER")
    [install] = [r for r in _instruction("RUN") if "pip install" in r]
    assert f"install -d -o {user} -m 700 {state}" in install
    monkeypatch.setenv("PROXY_ADMIN_KEY", "admin-key")
    monkeypatch.setenv("REDIS_URL", "")
    monkeypatch.setenv("PROXY_STATE_DIR", state)
    config = load_config(DEPLOY / "config" / "routes.yaml")
    assert config.redis.urls == ()
    assert config.accounting.ledger_path == f"{state}/ledger.sqlite3"


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def _runtime_requirements() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def _applies(requirement: Requirement) -> bool:
    """On the image's platform (Linux), with no extra asked for."""
    marker: Marker | None = requirement.marker
    return marker is None or marker.evaluate({"sys_platform": "linux", "extra": ""})


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = _constraints()
    seen: set[str] = set()
    todo = [r for r in _runtime_requirements() if _applies(r)]
    for declared in todo[:]:
        name = canonicalize_name(declared.name)
        assert name in pins, f"{declared.name} is not in {CONSTRAINTS.name}"
        assert declared.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {declared}"
    while todo:  # and what they need, as installed here
        name = canonicalize_name(todo.pop().name)
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"{name} (a dependency's dependency) is not in {CONSTRAINTS.name}"
        todo += [Requirement(r) for r in distribution(name).requires or []]
        todo = [r for r in todo if _applies(r)]
    assert set(pins) == seen, f"pinned but not needed: {set(pins) - seen}"


def _k8s_documents() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml_documents(p)]


def _k8s(kind: str, name_prefix: str = "llm") -> dict[str, Any]:
    found = [
        d
        for d in _k8s_documents()
        if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)
    ]
    assert len(found) == 1, kind
    first: dict[str, Any] = found[0]
    return first


def _env(container: dict[str, Any]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = container["env"]
    return env


def test_kubernetes_deployment_shares_redis_and_mounts_config_and_keys() -> None:
    deployment = _k8s("Deployment")
    assert deployment["spec"]["replicas"] > 1
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in _env(container)}
    assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    # Kubernetes expands $(NAME) only from variables defined before it.
    names = [e["name"] for e in _env(container)]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
    assert container["envFrom"] == [{"secretRef": {"name": "llm-proxy-keys"}}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert not container["image"].endswith(":latest")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "routes")
    # subPath mounts never see ConfigMap updates; a directory mount does (symlink swap).
    assert "subPath" not in mount and mount["mountPath"] == "/etc/proxy"
    assert _flag(container["args"], "--config") == "/etc/proxy/routes.yaml"
    volume = next(v for v in pod["volumes"] if v["name"] == "routes")
    assert volume["configMap"]["name"] == _k8s("ConfigMap")["metadata"]["name"]
    assert _k8s("Service")["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # The image's port, user and config path, as the Dockerfile has them.
    [image_port] = _instruction("EXPOSE")
    assert _flag(container["args"], "--port") == image_port
    assert str(pod["securityContext"]["runAsUser"]) == _instruction("USER")[0]
    assert Path(_flag(container["args"], "--config")).name in _k8s("ConfigMap")["data"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == _flag(container["args"], "--port")
    [port] = container["ports"]
    assert str(port["containerPort"]) == annotations["prometheus.io/port"]


def _secret_keys_used() -> set[str]:
    """Every key of the Secret the manifests read, by secretKeyRef or as envFrom."""
    keys = set()
    for doc in _k8s_documents():
        text = json.dumps(doc)
        keys |= set(re.findall(r'"secretKeyRef": \{"name": "llm-proxy-keys", "key": "(\w+)"', text))
    return keys | {"WANDB_API_KEY", "PRIME_API_KEY", "PROXY_ADMIN_KEY"}  # routes.yaml's


def test_kubernetes_secret_comes_from_an_uncommitted_file_with_every_key() -> None:
    kustomization = yaml_documents(K8S / "kustomization.yaml")[0]
    [generator] = kustomization["secretGenerator"]
    assert generator["name"] == "llm-proxy-keys"
    assert generator["envs"] == ["keys.env"]
    assert _is_ignored(K8S / "keys.env"), "keys.env must be ignored by git"
    example = (K8S / "keys.env.example").read_text()
    documented = set(re.findall(r"^(\w+)=", example, flags=re.MULTILINE))
    assert documented == _secret_keys_used()
    routes = _k8s("ConfigMap")["data"]["routes.yaml"]
    assert set(re.findall(r"\$\{(\w+)", routes)) <= documented | {"REDIS_URL"}


def _is_ignored(path: Path) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0


def test_kubernetes_redis_keeps_its_data_behind_a_password() -> None:
    redis = _k8s("StatefulSet", "redis")
    pod = redis["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _env(container)}
    assert env["REDIS_PASSWORD"] == {"name": "llm-proxy-keys", "key": "REDIS_PASSWORD"}
    assert env["REDISCLI_AUTH"] == env["REDIS_PASSWORD"]  # the probe's redis-cli logs in
    [claim] = redis["spec"]["volumeClaimTemplates"]
    [mount] = container["volumeMounts"]
    assert mount == {"name": claim["metadata"]["name"], "mountPath": "/data"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    service = _k8s("Service", "redis")
    assert service["metadata"]["name"] == redis["spec"]["serviceName"]
    assert service["spec"]["ports"][0]["port"] == 6379  # REDIS_URL's redis:6379


def test_kubernetes_prometheus_scrapes_the_kustomized_namespace() -> None:
    namespace = yaml_documents(K8S / "kustomization.yaml")[0]["namespace"]
    [job] = yaml_documents(DEPLOY / "prometheus-k8s.yml")[0]["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [namespace]


def test_kustomize_builds_the_whole_deployment_in_one_apply(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("!!! kubectl is not installed: `kubectl kustomize deploy/k8s` NOT run !!!")
    shutil.copytree(K8S, tmp_path / "k8s")
    shutil.copy(K8S / "keys.env.example", tmp_path / "k8s" / "keys.env")
    built = subprocess.run(
        [kubectl, "kustomize", str(tmp_path / "k8s")], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    documents = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert documents[0]["kind"] == "Namespace"  # applied first: a fresh cluster works
    [secret] = [d for d in documents if d["kind"] == "Secret"]
    assert secret["metadata"]["namespace"] == documents[0]["metadata"]["name"]
    assert secret["metadata"]["name"].startswith("llm-proxy-keys-")  # hashed: keys roll out
    references = re.findall(r"llm-proxy-keys[\w-]*", built.stdout)
    assert set(references) == {secret["metadata"]["name"]}, references


def test_configmap_routes_yaml_is_a_valid_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    path = tmp_path / "routes.yaml"
    path.write_text(_k8s("ConfigMap")["data"]["routes.yaml"])
    config = load_config(path)
    assert config.redis.urls == ("redis://redis:6379/0",)
    assert config.models
    assert all(p.engine is None for p in config.providers.values())  # the same image
