"""The deployment files hold together: compose, Prometheus rules, Alertmanager, Grafana, Kubernetes.

No Docker engine is needed: Debian's ``docker-compose`` validates the compose file, and
``promtool`` (package ``prometheus``) checks the Prometheus configuration and rules and runs
the alert unit tests of ``deploy/prometheus/alerts_test.yml``. ``amtool`` (package
``prometheus-alertmanager``) and ``kubectl`` check their files when they are installed.
A test whose tool is missing is skipped, naming the package. What needs no tool is checked
here directly: the Kubernetes manifests, the dashboards, the runbook links, the metric
documentation, the database metrics' bookkeeping. Whether the dashboards and alerts show
real data is tests/test_prometheus.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the deployment files")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
SERVICES = ("acquirer", "gateway", "billing", "hsm")
HTTP_PORTS = {"acquirer": 8080, "gateway": 8081, "billing": 8082, "hsm": 8083}
#: The course's alerts (issue: observability and deployment).
ALERTS = {
    "PaylabServiceDown",
    "PaylabHighErrorRate",
    "PaylabHighLatency",
    "PaylabDatabaseErrors",
    "PaylabDatabaseSlow",
    "PaylabSafBacklog",
    "PaylabBreakerOpen",
    "PaylabLedgerLost",
    "PaylabApprovalsWithheld",
    "PaylabPostingOrphaned",
}
DASHBOARD_UIDS = {"paylab-overview", "paylab-gateway", "paylab-business", "paylab-services"}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return path


def run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------------
# docker compose


def test_compose_file_is_valid() -> None:
    docker_compose = tool("docker-compose", "docker-compose")
    r = run([docker_compose, "-f", str(COMPOSE), "config"])
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(r.stdout)
    services = config["services"]
    assert set(services) >= {*SERVICES, "postgres", "prometheus", "grafana", "alertmanager"}
    for name, svc in services.items():
        # Every server has a healthcheck; the demo traffic generator serves nothing.
        assert "healthcheck" in svc or name == "traffic", f"{name} has no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond["condition"] == "service_healthy", (name, dep)
    for name in SERVICES:
        svc = services[name]
        assert svc["image"] == "paylab:local" and svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert svc["command"] == [name]
        env = svc["environment"]
        assert env["PAYLAB_HOST"] == "0.0.0.0"
        if name != "hsm":
            assert env[f"PAYLAB_{name.upper()}_DB_URL"].startswith("postgresql+psycopg://")
            assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert f"http://127.0.0.1:{HTTP_PORTS[name]}/health" in svc["healthcheck"]["test"]
    # Start order follows the network: hsm <- billing <- gateway <- acquirer.
    assert "hsm" in services["billing"]["depends_on"]
    assert "billing" in services["gateway"]["depends_on"]
    assert "gateway" in services["acquirer"]["depends_on"]
    # Grafana opens dashboards without a login, provisioned from the repository's files.
    grafana = services["grafana"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("/")}
    assert (Path(mounts["/etc/grafana/dashboards"]) / Path(home).name).is_file()
    assert Path(mounts["/etc/grafana/provisioning"]) == DEPLOY / "grafana" / "provisioning"
    assert set(config["volumes"]) >= {"postgres-data", "prometheus-data", "grafana-data"}


def test_prometheus_scrapes_the_compose_services() -> None:
    config = load_yaml(PROM / "prometheus.yml")
    compose = load_yaml(COMPOSE)["services"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "paylab"]
    targets = {s["labels"]["service"]: s["targets"] for s in job["static_configs"]}
    assert set(targets) == set(SERVICES)
    for service, (target,) in targets.items():
        host, port = target.split(":")
        assert host in compose and int(port) == HTTP_PORTS[service], target
    am = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]
    assert am.split(":")[0] in compose
    provisioned = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert provisioned["datasources"][0]["url"].split("//")[1].split(":")[0] in compose


# --------------------------------------------------------------------------------------------
# Prometheus and Alertmanager


def test_promtool_check_config() -> None:
    promtool = tool("promtool", "prometheus")
    r = run([promtool, "check", "config", "prometheus.yml"], cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_rules() -> None:
    promtool = tool("promtool", "prometheus")
    r = run([promtool, "check", "rules", "alerts.yml"], cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout


def test_promtool_alert_unit_tests() -> None:
    promtool = tool("promtool", "prometheus")
    r = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr


def alert_rules() -> list[dict[str, Any]]:
    return [rule for g in load_yaml(PROM / "alerts.yml")["groups"] for rule in g["rules"]]


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of a Markdown text."""
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_alert_has_severity_texts_runbook_and_unit_tests() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    anchors = heading_anchors((ROOT / "docs" / "runbooks.md").read_text())
    tests = load_yaml(PROM / "alerts_test.yml")["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        doc, _, anchor = notes["runbook_url"].partition("#")
        assert doc == "docs/runbooks.md" and anchor in anchors, (name, notes["runbook_url"])
        assert name in fired, f"no test shows {name} firing"
        assert name in quiet, f"no test shows {name} staying quiet"


def test_alertmanager_config_routes_by_severity() -> None:
    config = load_yaml(DEPLOY / "alertmanager" / "alertmanager.yml")
    receivers = {r["name"]: r for r in config["receivers"]}
    for route in config["route"]["routes"]:
        (matcher,) = route["matchers"]
        severity = matcher.split("=")[1].strip('"')
        hooks = receivers[route["receiver"]]["webhook_configs"]
        assert hooks and hooks[0]["url"].endswith("/" + severity), route
    severities = {r["labels"]["severity"] for r in alert_rules()}
    routed = {m.split("=")[1].strip('"') for r in config["route"]["routes"] for m in r["matchers"]}
    assert severities <= routed
    amtool = tool("amtool", "prometheus-alertmanager")
    path = str(DEPLOY / "alertmanager" / "alertmanager.yml")
    r = run([amtool, "check-config", path])
    assert r.returncode == 0, r.stdout + r.stderr
    for severity in ("critical", "warning"):
        r = run(
            [amtool, "config", "routes", "test", f"--config.file={path}", f"severity={severity}"]
        )
        assert r.returncode == 0 and r.stdout.strip() == severity, r.stdout + r.stderr


# --------------------------------------------------------------------------------------------
# Grafana


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def all_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboards_have_stable_unique_uids_and_targets() -> None:
    boards = dashboards()
    uids = [b["uid"] for b in boards.values()]
    assert sorted(uids) == sorted(DASHBOARD_UIDS)  # stable: links and bookmarks use them
    titles = [b["title"] for b in boards.values()]
    assert len(set(titles)) == len(titles)
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    ds_uid = datasource["datasources"][0]["uid"]
    for name, board in boards.items():
        ids = [p["id"] for p in all_panels(board)]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        variables = {v["name"] for v in board.get("templating", {}).get("list", [])}
        for panel in all_panels(board):
            where = f"{name} / {panel['title']}"
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, where
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == ds_uid, where
            assert panel.get("description"), f"{where}: no description"
            targets = panel.get("targets", [])
            assert targets, f"{where}: no targets"
            for target in targets:
                assert target["expr"].strip(), where
                assert target["datasource"]["uid"] == ds_uid, where
                used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
                assert used <= variables | {"__rate_interval", "__interval", "__range"}, where
        for var in board.get("templating", {}).get("list", []):
            assert var["datasource"]["uid"] == ds_uid


def test_dashboard_provider_points_at_the_mounted_folder() -> None:
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "paylab.yml")
    (p,) = provider["providers"]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[p["options"]["path"]] == "./grafana/dashboards"


# --------------------------------------------------------------------------------------------
# Kubernetes


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objects


def probe_path(probe: dict[str, Any]) -> str:
    if "httpGet" in probe:
        return str(probe["httpGet"]["path"])
    return " ".join(probe["exec"]["command"])


def test_kubernetes_deployments_have_probes_and_resources() -> None:
    objects = k8s_objects()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for obj in objects:
        assert obj["apiVersion"] and obj["metadata"]["name"], obj
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    deployments = by_kind["Deployment"]
    assert set(deployments) == set(SERVICES)
    assert deployments["gateway"]["spec"]["replicas"] == 2
    config_maps, secrets = by_kind["ConfigMap"], by_kind["Secret"]
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        assert container["args"] == [name]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == HTTP_PORTS[name], name
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            assert probe, f"{name}: no {kind}"
            assert "/health" in probe_path(probe), f"{name}: {kind} does not ask /health"
            assert f":{ports['http']}/" in probe_path(probe) or "httpGet" in probe, name
        resources = container["resources"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[bound]), f"{name}: {bound}"
        for ref in container.get("envFrom", []):
            assert ref["configMapRef"]["name"] in config_maps
        for env in container.get("env", []):
            secret_ref = env.get("valueFrom", {}).get("secretKeyRef")
            if secret_ref:
                secret = secrets[secret_ref["name"]]
                assert secret_ref["key"] in secret["stringData"], (name, env["name"])
        if name != "hsm":  # every service with a database is on PostgreSQL
            key = f"PAYLAB_{name.upper()}_DB_URL"
            (env,) = [e for e in container["env"] if e["name"] == key]
            url = secrets["paylab-secrets"]["stringData"][env["valueFrom"]["secretKeyRef"]["key"]]
            assert url.startswith("postgresql+psycopg://"), name
    replica_env = {
        e["name"]
        for e in deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert "PAYLAB_REPLICA_ID" in replica_env  # replicas sharing one queue need distinct ids
    # Every Service selects pods of a workload and targets ports they declare.
    workloads = {**deployments, **by_kind.get("StatefulSet", {})}
    for name, svc in by_kind["Service"].items():
        selector = svc["spec"]["selector"].items()
        matches = [
            w
            for w in workloads.values()
            if selector <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matches, f"Service {name} selects nothing"
        declared = {
            p["name"]
            for c in matches[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in declared, (name, port)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kubectl = tool("kubectl", "kubernetes-client")
    r = run([kubectl, "kustomize", str(DEPLOY / "k8s")])
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------
# Documentation of the metrics


def registered_metrics() -> set[str]:
    """Every metric family the four services register, as exposed (counters with _total)."""
    from shared.network import make_service
    from tests.support import lab_settings

    names: set[str] = set()
    settings = lab_settings(Path("/nonexistent"))
    for service in SERVICES:
        svc = make_service(service, settings)
        for fam in svc.metrics.registry.collect():
            names.add(fam.name + ("_total" if fam.type == "counter" else ""))
    return names


def test_every_metric_is_documented() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    names = registered_metrics()
    assert len(names) >= 40
    missing = sorted(n for n in names if f"`{n}" not in doc)
    assert not missing, f"not in docs/metrics.md: {missing}"
    forbidden = re.compile(r"\b(pan|stan|rrn|terminal|terminal_id|card)\b")
    for line in doc.splitlines():
        if line.startswith("| `paylab_"):
            labels_cell = line.split("|")[3] if line.count("|") > 3 else ""
            assert not forbidden.search(labels_cell), line


# --------------------------------------------------------------------------------------------
# The database metrics of shared.metrics (the alerts' inputs)


def test_database_metrics_time_calls_and_count_failures() -> None:
    from prometheus_client import CollectorRegistry
    from sqlalchemy.exc import OperationalError

    from shared.db import DatabaseError
    from shared.metrics import DatabaseMetrics

    registry = CollectorRegistry()
    metrics = DatabaseMetrics(registry, in_use=lambda: 3, waiting=lambda: 2)

    def value(name: str) -> float:
        return registry.get_sample_value(name) or 0.0

    assert metrics.instrument(lambda a, b: a + b, 1, 2)() == 3
    assert value("paylab_db_call_duration_seconds_count") == 1
    assert value("paylab_db_wait_seconds_count") == 1

    def broken() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    def store_failure() -> None:
        raise DatabaseError("billing database failure")

    def bug() -> None:
        raise ValueError("not a database problem")

    for fn, exc in ((broken, OperationalError), (store_failure, DatabaseError), (bug, ValueError)):
        with pytest.raises(exc):
            metrics.instrument(fn)()
    assert value("paylab_db_errors_total") == 2  # the bug is not a database error
    assert value("paylab_db_call_duration_seconds_count") == 4
    assert value("paylab_db_connections_in_use") == 3
    assert value("paylab_db_calls_waiting") == 2
