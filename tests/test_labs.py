"""The lab checks: sans-IO over hand-built snapshots, and `paylab lab check 3` as a real
subprocess against a network on ephemeral ports (real sockets, real SQLite)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from shared.lab.course import (
    EXPECTED_ALERTS,
    LABS,
    Finding,
    LabSnapshot,
    Prometheus,
    check,
    parse_locust_stats,
)
from shared.lab.network import Network
from shared.lab.top import Snapshot
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    RawIsoClient,
    lab_settings,
    terminal_builder,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent


# -- hand-built snapshots -----------------------------------------------------------------------
def exposition(samples: Mapping[str, float]) -> str:
    """Prometheus text from ``{'name{labels}': value}`` (untyped samples are fine)."""
    return "".join(f"{key} {value}\n" for key, value in samples.items())


GOOD_GATEWAY = {
    'paylab_upstream_retries_total{upstream="billing",reason="rc_91"}': 2,
    'paylab_upstream_retries_total{upstream="hsm",reason="rc_91"}': 0,
    'paylab_breaker_transitions_total{upstream="billing",to_state="open"}': 1,
    'paylab_breaker_transitions_total{upstream="billing",to_state="half_open"}': 1,
    'paylab_breaker_transitions_total{upstream="billing",to_state="closed"}': 1,
    'paylab_standin_total{outcome="approved"}': 3,
    'paylab_saf_forwarded_total{kind="advice",state="done"}': 3,
    'paylab_iso_requests_total{mti="0200",code="00"}': 180,
    'paylab_iso_requests_total{mti="0200",code="88"}': 100,
    'paylab_iso_requests_total{mti="0200",code="91"}': 2,
    'paylab_iso_requests_total{mti="0800",code="00"}': 500,
}
LINKS = {
    "links": [
        {"name": "billing", "healthy": 2, "target": 2},
        {"name": "hsm", "healthy": 2, "target": 2},
    ]
}
BREAKERS = {
    "breakers": [{"name": "billing", "state": "closed"}, {"name": "hsm", "state": "closed"}]
}
SAF = {"counts": {"queued": 0, "in_flight": 0, "done": 3, "dead": 0, "cancelled": 0}}
NO_FAULTS = {
    "latency": 0.0,
    "jitter": 0.0,
    "blackhole": 0.0,
    "reset": 0.0,
    "close_after": None,
    "bandwidth": None,
    "probability": 1.0,
}


def chaos_view(**changes: Any) -> dict[str, Any]:
    billing = {"name": "billing", "faults": dict(NO_FAULTS), "partitioned": False}
    billing.update({"bytes_dropped": 1200, "resets": 0})
    billing.update(changes.pop("billing", {}))
    view: dict[str, Any] = {
        "links": [billing, {"name": "hsm", "faults": dict(NO_FAULTS), "partitioned": False}],
        "database": {"billing": {"down": False, "refused": 4}},
        "flood": None,
    }
    view.update(changes)
    return view


PROM_TARGETS = {
    "status": "success",
    "data": {
        "activeTargets": [
            {"labels": {"job": "paylab", "service": s}, "health": "up"}
            for s in ("acquirer", "gateway", "billing", "hsm")
        ]
    },
}
PROM_RULES = {
    "status": "success",
    "data": {
        "groups": [
            {"name": "paylab", "rules": [{"name": a, "type": "alerting"} for a in EXPECTED_ALERTS]}
        ]
    },
}


def snapshot(
    gateway: Mapping[str, float] | None = None,
    *,
    drop: tuple[str, ...] = (),
    links: Any = LINKS,
    breakers: Any = BREAKERS,
    saf: Any = SAF,
    chaos: Any = None,
    prometheus: Prometheus | None = None,
    locust: list[dict[str, str]] | None = None,
    locust_error: str | None = None,
) -> LabSnapshot:
    samples = {k: v for k, v in (gateway or GOOD_GATEWAY).items() if k not in drop}
    net = Snapshot.build(
        0.0,
        {"gateway": exposition(samples), "acquirer": "", "billing": "", "hsm": ""},
        links=links,
        breakers=breakers,
        saf=saf,
        chaos=chaos_view() if chaos is None else chaos,
    )
    return LabSnapshot(net, {}, prometheus, locust, locust_error)


def failed(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if not f.ok]


def only_failure(findings: list[Finding]) -> Finding:
    bad = failed(findings)
    assert len(bad) == 1, bad
    assert bad[0].hint
    return bad[0]


# -- lab by lab -------------------------------------------------------------------------------
def test_every_lab_has_a_page() -> None:
    assert list(LABS) == [1, 2, 3, 4, 5, 6, 7]
    for lab in LABS.values():
        assert (ROOT / "docs" / "labs" / lab.page).is_file(), lab.page


def test_lab1_retry() -> None:
    assert not failed(check(1, snapshot()))
    no_retry = dict(GOOD_GATEWAY)
    no_retry['paylab_upstream_retries_total{upstream="billing",reason="rc_91"}'] = 0
    assert "database billing --down" in only_failure(check(1, snapshot(no_retry))).hint
    sick = {"links": [{"name": "billing", "healthy": 0, "target": 2}]}
    assert "billing 0/2" in only_failure(check(1, snapshot(links=sick))).hint
    down = chaos_view(database={"billing": {"down": True, "refused": 3}})
    assert only_failure(check(1, snapshot(chaos=down))).hint == "paylab chaos database billing --up"


@pytest.mark.parametrize("state", ["open", "half_open", "closed"])
def test_lab2_breaker_transitions(state: str) -> None:
    assert not failed(check(2, snapshot()))
    key = f'paylab_breaker_transitions_total{{upstream="billing",to_state="{state}"}}'
    finding = only_failure(check(2, snapshot(drop=(key,))))
    assert state.replace("_", "-") in finding.what and "never yet" in finding.hint


def test_lab2_breaker_must_be_closed_now() -> None:
    half = {"breakers": [{"name": "billing", "state": "half_open"}]}
    assert "billing half_open" in only_failure(check(2, snapshot(breakers=half))).hint


def test_lab3_store_and_forward() -> None:
    assert not failed(check(3, snapshot()))
    key = 'paylab_standin_total{outcome="approved"}'
    assert "partition billing" in only_failure(check(3, snapshot(drop=(key,)))).hint
    key = 'paylab_saf_forwarded_total{kind="advice",state="done"}'
    assert "heal billing" in only_failure(check(3, snapshot(drop=(key,)))).hint
    queued = {"counts": {"queued": 2, "in_flight": 1, "dead": 0}}
    assert "3 entries still to deliver" in only_failure(check(3, snapshot(saf=queued))).hint
    dead = {"counts": {"queued": 0, "in_flight": 0, "dead": 1}}
    assert "paylab saf retry" in only_failure(check(3, snapshot(saf=dead))).hint


def test_lab3_without_the_gateway_names_it() -> None:
    net = Snapshot.build(0.0, {"gateway": None}, errors={"gateway": "connection refused"})
    findings = check(3, LabSnapshot(net))
    assert findings and all(not f.ok and "gateway" in f.hint for f in findings)


def test_lab4_monitoring() -> None:
    good = Prometheus("http://p:9090", PROM_TARGETS, PROM_RULES)
    assert not failed(check(4, snapshot(prometheus=good)))
    away = check(4, snapshot(prometheus=Prometheus("http://p:9090", error="not answering")))
    assert len(failed(away)) == 3 and "prometheus.local.yml" in away[0].hint
    targets = json.loads(json.dumps(PROM_TARGETS))
    targets["data"]["activeTargets"][2]["health"] = "down"
    bad = Prometheus("http://p:9090", targets, PROM_RULES)
    assert "down: billing" in only_failure(check(4, snapshot(prometheus=bad))).hint
    del targets["data"]["activeTargets"][0]
    bad = Prometheus("http://p:9090", targets, PROM_RULES)
    assert "service=acquirer" in only_failure(check(4, snapshot(prometheus=bad))).hint
    rules = {"data": {"groups": [{"rules": [{"name": "PaylabServiceDown", "type": "alerting"}]}]}}
    bad = Prometheus("http://p:9090", PROM_TARGETS, rules)
    assert "PaylabBreakerOpen" in only_failure(check(4, snapshot(prometheus=bad))).hint


def test_expected_alerts_are_those_of_the_rules_file() -> None:
    text = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    assert tuple(re.findall(r"- alert: (\w+)", text)) == EXPECTED_ALERTS


STATS_CSV = (
    "Type,Name,Request Count,Failure Count,Median Response Time\n"
    "ISO,0200 payment [normal],120,0,40\n"
    ",Aggregated,{count},{failures},35\n"
)


def test_lab5_load() -> None:
    assert not failed(check(5, snapshot()))
    rows = parse_locust_stats(STATS_CSV.format(count=300, failures=0))
    assert not failed(check(5, snapshot(locust=rows)))
    rows = parse_locust_stats(STATS_CSV.format(count=300, failures=4))
    assert "failures.csv" in only_failure(check(5, snapshot(locust=rows))).hint
    missing = check(5, snapshot(locust_error="reports/x_stats.csv: No such file"))
    assert only_failure(missing).hint.startswith("reports/x_stats.csv")
    little = {'paylab_iso_requests_total{mti="0200",code="00"}': 20}
    assert "locust" in only_failure(check(5, snapshot(little))).hint
    errors = dict(GOOD_GATEWAY)
    errors['paylab_iso_requests_total{mti="0200",code="91"}'] = 50
    assert "too many errors" in only_failure(check(5, snapshot(errors))).hint
    with pytest.raises(ValueError):
        parse_locust_stats("a,b\n1,2\n")


def test_lab6_chaos() -> None:
    assert not failed(check(6, snapshot()))
    quiet = chaos_view(billing={"bytes_dropped": 0}, database={})
    assert "steps 2 to 5" in only_failure(check(6, snapshot(chaos=quiet))).hint
    flooded = chaos_view(billing={"bytes_dropped": 0}, database={}, flood={"opened": 3})
    assert not failed(check(6, snapshot(chaos=flooded)))
    parted = chaos_view(billing={"partitioned": True})
    assert "billing: partitioned" in only_failure(check(6, snapshot(chaos=parted))).hint
    slow = chaos_view(billing={"faults": {**NO_FAULTS, "latency": 0.3}})
    assert "latency 300ms" in only_failure(check(6, snapshot(chaos=slow))).hint
    opened = {
        "breakers": [{"name": "billing", "state": "open"}, {"name": "hsm", "state": "closed"}]
    }
    assert "billing open" in only_failure(check(6, snapshot(breakers=opened))).hint
    acquirer_open = {
        "breakers": [
            *BREAKERS["breakers"],
            {"service": "acquirer", "name": "gateway", "state": "open"},
        ]
    }
    hint = only_failure(check(6, snapshot(breakers=acquirer_open))).hint
    assert "acquirer/gateway open" in hint
    queued = {"counts": {"queued": 1, "in_flight": 0, "dead": 0}}
    assert "1 entries" in only_failure(check(6, snapshot(saf=queued))).hint
    no_chaos = Snapshot.build(
        0.0, {"gateway": exposition(GOOD_GATEWAY)}, links=LINKS, breakers=BREAKERS, saf=SAF
    )
    findings = failed(check(6, LabSnapshot(no_chaos)))
    assert len(findings) == 2 and all("--chaos" in f.hint for f in findings)


# -- `paylab lab check 3` against a real network ------------------------------------------------
LAB_TIMINGS: dict[str, Any] = {
    "heartbeat_interval": 0.5,
    "heartbeat_timeout": 0.5,
    "breaker_open_wait": 1.0,
    "retry_base_delay": 0.05,
    "retry_max_delay": 0.1,
    "reconnect_base_delay": 0.05,
    "reconnect_max_delay": 0.2,
    "connect_timeout": 0.5,
    "billing_timeout": 1.0,
    "rate_limit_terminal": 0,
}


async def lab_check(net: Network, number: int) -> tuple[int, str, str]:
    host = "http://127.0.0.1"
    args = [f"--{name}-url={host}:{net.ports[name].http}" for name in net.ports]
    args.append(f"--chaos-url={host}:{net.chaos_port}")
    done = await trio.run_process(
        [sys.executable, "-m", "shared.cli", "lab", "check", str(number), *args, "--json"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_lab_check_3_on_a_real_network(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = Network(lab_settings(tmp_path, **LAB_TIMINGS), chaos=True)
    await nursery.start(net.run)
    assert net.chaos is not None
    link = net.services["gateway"].billing  # type: ignore[attr-defined]
    await wait_for(lambda: link.available, timeout=10)

    # A fresh network: the check fails and names what is missing.
    code, out, _ = await lab_check(net, 3)
    assert code == 1
    body = json.loads(out)
    missing = [f["what"] for f in body["findings"] if not f["ok"]]
    assert any("stand-in" in what for what in missing)
    assert any("advices were delivered" in what for what in missing)

    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    net.chaos.partition("billing")
    await wait_for(lambda: not link.available, timeout=10)
    for bill, amount in (("PLN-1002", 98_500), ("PLN-1003", 212_750)):
        answer = await client.roundtrip(
            terminal_builder("LABCHK01").payment(bill, amount, DEMO_PAN, DEMO_PIN)
        )
        assert answer["39"] == "00" and answer["38"].startswith("SI")
    await client.aclose()
    net.chaos.heal("billing")

    # The queue drains once billing is back: poll the check itself, with a deadline.
    with trio.fail_after(30):
        while (result := await lab_check(net, 3))[0] != 0:
            await trio.sleep(0.2)
    body = json.loads(result[1])
    assert body["ok"] and all(f["ok"] for f in body["findings"])
    with trio.fail_after(20):
        await net.stop()


async def test_lab_check_with_nothing_listening_is_one_line() -> None:
    url = "http://127.0.0.1:9"  # discard port: nothing listens there
    args = [f"--{n}-url={url}" for n in ("acquirer", "gateway", "billing", "hsm", "chaos")]
    done = await trio.run_process(
        [sys.executable, "-m", "shared.cli", "lab", "check", "1", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    err = done.stderr.decode()
    assert done.returncode == 1 and "no service answers" in err and "Traceback" not in err
    done = await trio.run_process(
        [sys.executable, "-m", "shared.cli", "lab", "check", "99"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 2 and "unknown lab 99" in done.stderr.decode()


def test_local_prometheus_config_is_valid_and_scrapes_the_default_ports() -> None:
    config = ROOT / "deploy" / "prometheus" / "prometheus.local.yml"
    text = config.read_text()
    for port in (8080, 8081, 8082, 8083):
        assert f'"127.0.0.1:{port}"' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    done = subprocess.run(
        [promtool, "check", "config", config.name],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 10 rules found" in done.stdout + done.stderr
