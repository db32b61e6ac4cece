"""Dashboards and alert rules against a real Prometheus scraping a real network.

The four services run in this process on ephemeral ports; Debian's ``prometheus`` binary
scrapes them every second with the target labels of ``deploy/prometheus/prometheus.yml``
and evaluates ``deploy/prometheus/alerts.yml``. Traffic covers approvals, inquiries,
declines (wrong PIN, unknown bill, paid bill, wrong amount), a repeat, a reversal, and a
billing outage: stand-in approvals while billing is down, then the queue drains once it
is back. Then every PromQL expression of every Grafana dashboard and every alert rule is
asked of Prometheus's HTTP API:

* each evaluates without error, and Prometheus evaluates every rule without error;
* each dashboard panel returns data (a non-empty result with a number);
* each template variable's ``label_values`` query finds values, and a panel of a row
  repeated per service returns data for every service;
* each metric name an expression refers to is one the services expose (no typo hides
  behind a panel that happens to show another target's data);
* no label carries a PAN, STAN, RRN, terminal id or bill number, by name or by value.

Every wait is on a condition with a deadline; the whole test is bounded to 90 s.
Skipped when the ``prometheus`` binary is not installed (``apt-get install prometheus``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from billing.service import BillingService
from gateway.service import GatewayService
from shared.lab.network import Network
from tests.support import DEMO_PAN, DEMO_PIN, RawIsoClient, start_network, terminal_builder

yaml = pytest.importorskip("yaml", reason="PyYAML reads deploy/prometheus/*.yml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SERVICES = ("acquirer", "gateway", "billing", "hsm")

pytestmark = [
    pytest.mark.skipif(
        not os.access(PROMETHEUS, os.X_OK),
        reason="the prometheus binary is not installed (apt-get install prometheus)",
    ),
    pytest.mark.timeout(90),
]

#: A lab tuned for a short test: echoes every half second (echo round-trip panels),
#: quick reconnects, a breaker that probes again after 1 s, retries and queue attempts
#: at most 0.5 s apart (the queue drains soon after billing is back), no rate limit.
NETWORK_SETTINGS: dict[str, Any] = {
    "heartbeat_interval": 0.5,
    "reconnect_base_delay": 0.05,
    "reconnect_max_delay": 0.2,
    "breaker_open_wait": 1.0,
    "retry_base_delay": 0.05,
    "retry_max_delay": 0.5,
    "retry_max_attempts": 2,
    "saf_retry_interval": 0.2,
    "rate_limit_terminal": 0.0,
}

#: What Grafana would put in place of its built-in variables: windows wide enough to hold
#: the whole test's traffic.
BUILTINS = {"__rate_interval": "2m", "__interval": "15s", "__range": "1h"}

#: Bills of the demo data and their amounts (billing.demo_data).
AMOUNTS = {
    "PLN-1001": 125_000,
    "PLN-1002": 98_500,
    "PLN-1003": 212_750,
    "PLN-1005": 330_000,
    "PLN-1006": 47_500,
    "PLN-1007": 158_900,
    "PDAM-0001": 89_900,
    "TELCO-0001": 199_000,
    "TELCO-0002": 350_000,
}
STANDIN_BILLS = {
    "PLN-1008": 276_400,
    "PLN-1009": 89_000,
    "PLN-1010": 412_350,
    "PLN-1011": 55_250,
    "PLN-1012": 143_000,
    "PLN-1013": 199_999,
}
AFTER_BILLS = {"PLN-1014": 72_800, "PLN-1015": 250_000}


# --------------------------------------------------------------------------------------------
# Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_config(ports: dict[str, int], rules: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml pointed at this test's services, scraped every 1 s.

    The job and its target labels are the deployed file's own; only addresses, intervals
    and the rule file's path change, and the Alertmanager and self-scrape go away.
    """
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    config.pop("alerting", None)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "paylab"]
    seen = set()
    for static in job["static_configs"]:
        service = static["labels"]["service"]
        static["targets"] = [f"127.0.0.1:{ports[service]}"]
        seen.add(service)
    assert seen == set(SERVICES), f"prometheus.yml scrapes {sorted(seen)}"
    config["scrape_configs"] = [job]
    return config


@dataclass
class Prometheus:
    """A running Prometheus and a client of its HTTP API."""

    url: str
    http: httpx.AsyncClient
    log: Path

    async def api(self, path: str, **params: Any) -> Any:
        r = await self.http.get(self.url + path, params=params)
        body = r.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), (expr, data)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def value(self, expr: str) -> float:
        """The single value of ``expr`` (NaN when it returns nothing)."""
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def prometheus_proc(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], tuple[str, Path]]]:
    """Starts Debian's Prometheus on a free port with a config; killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any]) -> tuple[str, Path]:
        cfg = tmp_path / "prometheus.json"  # JSON is YAML: Prometheus reads it as is
        cfg.write_text(json.dumps(config))
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={cfg}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=tmp_path,
                )
            )
        return f"http://127.0.0.1:{port}", log

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


async def eventually(
    what: str, check: Callable[[], Awaitable[bool]], timeout: float, step: float = 0.2
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while True:
            try:
                if await check():
                    return
            except (httpx.HTTPError, AssertionError, KeyError, ValueError):
                pass
            await trio.sleep(step)
    raise AssertionError(f"not within {timeout} s: {what}")


# --------------------------------------------------------------------------------------------
# Dashboards and rules


@dataclass(frozen=True)
class Target:
    panel_id: int
    panel: str
    expr: str
    repeat: str | None  # the variable the panel's row is repeated over


def dashboard_targets(board: dict[str, Any]) -> Iterator[Target]:
    """Every PromQL target of ``board``, with the variable its row repeats over."""
    repeat: str | None = None
    for panel in board["panels"]:
        if panel["type"] == "row":
            repeat = panel.get("repeat")
            for inner in panel.get("panels", []):
                for t in inner.get("targets", []):
                    yield Target(inner["id"], inner["title"], t["expr"], repeat)
            continue
        if panel["datasource"]["type"] != "prometheus":
            continue  # the logs panel's LogQL goes to Loki (tests/test_deploy.py)
        for t in panel.get("targets", []):
            yield Target(panel["id"], panel["title"], t["expr"], repeat)


def substitute(expr: str, values: dict[str, str]) -> str:
    """``$name`` and ``${name}`` replaced as Grafana would (longest names first)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def has_number(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


METRIC_NAME = re.compile(r"\b(paylab_[a-z0-9_]+)\b")
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------------
# Traffic


class Lab:
    """The network, a terminal on the acquirer's listener, and the acquirer's HTTP API."""

    def __init__(self, net: Network, nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
        self.net = net
        self.nursery = nursery
        self.http = http
        self.builder = terminal_builder("PROMTEST")
        self.terminal: RawIsoClient | None = None

    @property
    def gateway(self) -> GatewayService:
        gw = self.net.services["gateway"]
        assert isinstance(gw, GatewayService)
        return gw

    async def send(self, msg: dict[str, str]) -> dict[str, str]:
        if self.terminal is None:
            self.terminal = await RawIsoClient.connect(self.net.ports["acquirer"].iso)
        return await self.terminal.roundtrip(msg, timeout=15)

    async def pay(self, bill: str, amount: int, pin: str = DEMO_PIN) -> dict[str, str]:
        return await self.send(self.builder.payment(bill, amount, DEMO_PAN, pin))

    async def api_pay(self, bill: str, amount: int) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.net.ports['acquirer'].http}/payments"
        body = {"bill": bill, "amount": amount, "pan": DEMO_PAN, "pin": DEMO_PIN}
        r = await self.http.post(url, json=body, timeout=15)
        return dict(r.json())

    async def saf_depth(self) -> int:
        saf = self.gateway.saf
        assert saf is not None
        stats = await self.gateway.in_db_thread(lambda: saf.stats(now=datetime.now(UTC)))
        return int(stats.depth)

    async def stop_billing(self) -> None:
        await self.net.services["billing"].stop()
        with trio.fail_after(10):
            while self.gateway.billing.available:
                await trio.sleep(0.02)

    async def restart_billing(self) -> None:
        """A new billing on the stopped one's ports and database."""
        old, ports = self.net.services["billing"], self.net.ports["billing"]
        settings = old.settings.model_copy(
            update={"billing_iso_port": ports.iso, "billing_http_port": ports.http}
        )
        billing = BillingService(settings, self.net.keys)
        await self.nursery.start(billing.run)
        self.net.services["billing"] = billing  # net.stop() stops this one

    async def close(self) -> None:
        if self.terminal is not None:
            await self.terminal.aclose()


async def drive_normal_traffic(lab: Lab) -> None:
    """Approvals on three billers, inquiries, a decline of each kind, a repeat, a reversal."""
    b = lab.builder
    for bill in ("PLN-1001", "PLN-1002", "PDAM-0001", "TELCO-0001"):
        assert (await lab.pay(bill, AMOUNTS[bill]))["39"] == "00", bill
    first = b.payment("PLN-1003", AMOUNTS["PLN-1003"], DEMO_PAN, DEMO_PIN)
    approved = await lab.send(first)
    assert approved["39"] == "00"
    assert (await lab.send(first))["39"] == "00"  # a repeat: answered from the record
    assert (await lab.send(b.reversal(first)))["39"] == "00"
    assert (await lab.send(b.inquiry("PLN-1007")))["39"] == "00"
    assert (await lab.send(b.inquiry("NOPE-0001")))["39"] == "25"
    assert (await lab.pay("PLN-1005", AMOUNTS["PLN-1005"], pin="9999"))["39"] == "55"
    assert (await lab.pay("NOPE-0002", 10_000))["39"] == "25"
    assert (await lab.pay("TELCO-0002", AMOUNTS["TELCO-0002"]))["39"] == "88"
    assert (await lab.pay("PLN-1006", 1))["39"] == "13"
    assert (await lab.api_pay("PLN-1007", AMOUNTS["PLN-1007"]))["response_code"] == "00"


def check_business_counts(lab: Lab) -> None:
    """Billing counted each outcome once, by biller and code; the repeat only as a replay."""
    billing = lab.net.services["billing"]
    assert isinstance(billing, BillingService)
    registry = billing.metrics.registry

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    payments = "paylab_payments_total"
    pln = ("PLN-1001", "PLN-1002", "PLN-1003", "PLN-1007")
    assert value(payments, biller="PLN", code="00", source="online") == len(pln)
    assert value(payments, biller="PDAM", code="00", source="online") == 1
    assert value(payments, biller="TELCO", code="00", source="online") == 1
    assert value(payments, biller="TELCO", code="88", source="online") == 1
    assert value(payments, biller="PLN", code="13", source="online") == 1
    assert value(payments, biller="unknown", code="55", source="online") == 1
    assert value(payments, biller="unknown", code="25", source="online") == 1
    assert value("paylab_payment_amount_sum", biller="PLN") == sum(AMOUNTS[b] for b in pln)
    assert value("paylab_payment_amount_count", biller="PLN") == len(pln)
    assert value("paylab_payment_replays_total", source="online") == 1
    assert value("paylab_payment_reversals_total", code="00") == 1
    assert value("paylab_bill_inquiries_total", biller="PLN", code="00") == 1
    assert value("paylab_bill_inquiries_total", biller="unknown", code="25") == 1
    hours = [value("paylab_payments_by_hour_total", hour=f"{h:02d}") for h in range(24)]
    assert sum(hours) == len(pln) + 2
    hsm = lab.net.services["hsm"].metrics.registry
    assert (hsm.get_sample_value("paylab_iso_requests_total", {"mti": "CA", "code": "00"}) or 0) > 0
    gateway_db = lab.gateway.metrics.registry
    assert (gateway_db.get_sample_value("paylab_db_call_duration_seconds_count") or 0) > 0


# --------------------------------------------------------------------------------------------
# The test


async def test_dashboards_and_alerts_on_a_live_network(
    tmp_path: Path,
    nursery: trio.Nursery,
    prometheus_proc: Callable[[dict[str, Any]], tuple[str, Path]],
) -> None:
    with trio.fail_after(80):
        net = await start_network(nursery, tmp_path / "lab", **NETWORK_SETTINGS)
        http_ports = {name: net.ports[name].http for name in SERVICES}
        url, log = prometheus_proc(
            prometheus_config(http_ports, DEPLOY / "prometheus" / "alerts.yml")
        )
        async with httpx.AsyncClient(timeout=10) as http:
            prom = Prometheus(url, http, log)
            lab = Lab(net, nursery, http)
            try:
                await run_scenario(prom, lab)
                await check_dashboards_and_rules(prom)
                await check_no_identifiers_in_labels(prom)
            except BaseException:
                print("prometheus log:\n" + prom.log_tail())
                raise
            finally:
                await lab.close()
        await net.stop()


async def run_scenario(prom: Prometheus, lab: Lab) -> None:
    async def ready() -> bool:
        return (await prom.http.get(prom.url + "/-/ready")).status_code == 200

    await eventually("Prometheus ready", ready, 20)

    async def all_up() -> bool:
        targets = (await prom.api("/api/v1/targets"))["activeTargets"]
        up = {t["labels"]["service"] for t in targets if t["health"] == "up"}
        return up == set(SERVICES)

    await eventually("the four services scraped", all_up, 15)

    await drive_normal_traffic(lab)
    check_business_counts(lab)

    # -- billing outage: the gateway approves in stand-in and queues advices ---------------
    await lab.stop_billing()

    async def billing_down() -> bool:  # PaylabServiceDown's expression sees it
        return bool(await prom.query('up{job="paylab", service="billing"} == 0'))

    await eventually("billing seen down", billing_down, 10)
    health = f"http://127.0.0.1:{lab.net.ports['gateway'].http}/health"
    probe = load_probe()
    outcomes = {}
    for mode in ("live", "self", "ready"):
        outcomes[mode], _ = await trio.to_thread.run_sync(probe.probe, mode, health)
    # Without billing the gateway is alive and can serve (stand-in), but is not all ready.
    assert outcomes == {"live": True, "self": True, "ready": False}, outcomes

    for bill, amount in STANDIN_BILLS.items():
        answer = await lab.pay(bill, amount)
        assert answer["39"] == "00", (bill, answer.get("39"))  # approved in stand-in
    assert await lab.saf_depth() == len(STANDIN_BILLS)

    async def backlog_seen() -> bool:
        backlog = 'max(sum by (instance) (paylab_saf_entries{state=~"queued|in_flight"}))'
        value = await prom.value(backlog)
        return value >= len(STANDIN_BILLS)

    await eventually("the queued advices seen by Prometheus", backlog_seen, 10)

    # -- billing back: the queue drains ------------------------------------------------------
    await lab.restart_billing()

    async def drained() -> bool:
        return await lab.saf_depth() == 0

    await eventually("the queue drained", drained, 20)
    for bill, amount in AFTER_BILLS.items():
        assert (await lab.pay(bill, amount))["39"] == "00", bill

    # Billing's new process counted the advices and the payments after the outage.
    posted = len(STANDIN_BILLS) + len(AFTER_BILLS)

    async def final_state_scraped() -> bool:
        done = await prom.value('sum(paylab_saf_forwarded_total{state="done"})')
        approved = await prom.value('sum(paylab_payments_total{code="00"})')
        up = await prom.value('sum(up{job="paylab"})')
        return done >= len(STANDIN_BILLS) and approved >= posted and up == len(SERVICES)

    await eventually("the final state scraped", final_state_scraped, 15)


def load_probe() -> Any:
    """deploy/probe.py as a module (the container health probe)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paylab_probe", DEPLOY / "probe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def check_dashboards_and_rules(prom: Prometheus) -> None:
    # Names with samples, and families the services describe (HELP) without any yet.
    names = set(await prom.api("/api/v1/label/__name__/values"))
    names |= set(await prom.api("/api/v1/metadata"))
    exposed = {m for m in names if m.startswith("paylab_")}
    exposed_families = {family(m) for m in exposed}
    problems: list[str] = []

    def check_names(where: str, expr: str) -> None:
        for name in METRIC_NAME.findall(expr):
            if name not in exposed and family(name) not in exposed_families:
                problems.append(f"{where}: no such metric {name}")

    # -- dashboards ----------------------------------------------------------------------
    assert DASHBOARDS, "no dashboard JSON"
    panels_checked = 0
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        variables: dict[str, list[str]] = {}
        for var in board.get("templating", {}).get("list", []):
            if var["type"] != "query":
                continue  # a fixed list (the logs panel's levels)
            definition = var["definition"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
            assert m, f"{board['uid']}: variable {var['name']}: {definition}"
            check_names(f"{board['uid']} variable {var['name']}", definition)
            series = await prom.api("/api/v1/series", **{"match[]": m.group(1)})
            found = sorted({s[m.group(2)] for s in series if m.group(2) in s})
            if not found:
                problems.append(f"{board['uid']}: variable {var['name']} finds no value")
            variables[var["name"]] = found
            if var["name"] == "service" and set(found) != set(SERVICES):
                problems.append(f"{board['uid']}: $service finds {found}")
        # Variables at their default (All) unless a row repeats over them.
        defaults = {**BUILTINS}
        for var in board.get("templating", {}).get("list", []):
            if var["type"] == "query":
                defaults[var["name"]] = var.get("allValue") or "|".join(variables[var["name"]])

        panel_data: dict[tuple[int, str | None], bool] = {}
        titles = {t.panel_id: t.panel for t in dashboard_targets(board)}
        for target in dashboard_targets(board):
            check_names(f"{board['uid']} / {target.panel}", target.expr)
            choices = variables.get(target.repeat, []) if target.repeat else [None]
            for choice in choices:
                values = dict(defaults)
                if target.repeat and choice is not None:
                    values[target.repeat] = choice
                expr = substitute(target.expr, values)
                try:
                    result = await prom.query(expr)
                except AssertionError as exc:
                    problems.append(f"{board['uid']} / {target.panel}: {exc}")
                    continue
                key = (target.panel_id, choice)
                panel_data[key] = panel_data.get(key, False) or has_number(result)
        for (panel_id, choice), ok in panel_data.items():
            panels_checked += 1
            if not ok:
                suffix = f" (service {choice})" if choice else ""
                problems.append(f"{board['uid']} / {titles[panel_id]}{suffix}: no data")

    # -- alert rules -------------------------------------------------------------------------
    rules = alert_rules()
    for rule in rules:
        check_names(f"alert {rule['alert']}", rule["expr"])
        try:
            await prom.query(rule["expr"])
        except AssertionError as exc:
            problems.append(f"alert {rule['alert']}: {exc}")

    async def rules_evaluated() -> bool:
        groups = (await prom.api("/api/v1/rules"))["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        return len(loaded) == len(rules) and all(
            not r["lastEvaluation"].startswith("0001") for r in loaded
        )

    await eventually("every rule evaluated", rules_evaluated, 10)
    groups = (await prom.api("/api/v1/rules"))["groups"]
    for loaded in (r for g in groups for r in g["rules"]):
        if loaded["health"] != "ok":
            problems.append(f"rule {loaded['name']}: {loaded['health']} {loaded.get('lastError')}")

    assert not problems, "\n".join(problems)
    assert panels_checked >= 60, panels_checked


async def check_no_identifiers_in_labels(prom: Prometheus) -> None:
    labels = set(await prom.api("/api/v1/labels"))
    forbidden = {"pan", "stan", "rrn", "terminal", "terminal_id", "bill", "bill_number", "card"}
    assert not labels & forbidden, labels & forbidden
    identifiers = {DEMO_PAN, "PROMTEST", *AMOUNTS, *STANDIN_BILLS, *AFTER_BILLS}
    for label in sorted(labels - {"le", "__name__"}):
        values = await prom.api(f"/api/v1/label/{label}/values", **{"match[]": '{job="paylab"}'})
        for value in values:
            assert not re.fullmatch(r"\d{6,}", value), (label, value)  # a STAN, RRN or PAN
            assert not any(i in value for i in identifiers), (label, value)
