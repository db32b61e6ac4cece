"""``paylab lab check N``: has a course lab reached its expected state? (sans-IO)

Nothing here does I/O. A shell (``shared/cli/lab.py``) reads, for one instant, what the
running network publishes and hands it over as a :class:`LabSnapshot`:

* a :class:`shared.lab.top.Snapshot`: each service's parsed ``/metrics`` (the chaos
  controller's too, under ``"chaos"``) and ``/breakers``, the gateway's ``/links`` and
  ``/saf/stats``, the chaos controller's ``/chaos``;
* the JSON of each service's ``/health``;
* optionally a Prometheus server's ``/api/v1/targets`` and ``/api/v1/rules`` answers;
* optionally the rows of a locust ``PREFIX_stats.csv`` (:func:`parse_locust_stats`).

:func:`check` runs the lab's check function and returns a list of :class:`Finding`: one per
expected fact, ``ok`` or not, with a hint that says what to do when it is not. A source
that is missing makes the findings that need it fail with a hint naming the source; a
check never raises on odd inputs. The expected states are described, lab by lab, in
``docs/labs/``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.lab.top import Snapshot, fault_text, select, total

#: The network's services, whose ``/metrics`` a check may read.
NETWORK_SERVICES = ("acquirer", "gateway", "billing", "hsm")
#: The alert rules of ``deploy/prometheus/alerts.yml`` (a unit test keeps them in step).
EXPECTED_ALERTS = (
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
)
#: Response codes that say the network failed (``docs/metrics.md``).
ERROR_CODES = frozenset({"68", "91", "96"})
#: Lab 5: the gateway must have answered at least this many requests (echoes not counted).
LOAD_MIN_REQUESTS = 200
#: Lab 5: at most this share of the gateway's 0200 answers may be network errors.
LOAD_MAX_ERROR_RATIO = 0.05


@dataclass(frozen=True)
class Finding:
    """One expected fact of a lab: reached (``ok``) or not, and what to do if not."""

    ok: bool
    what: str
    hint: str = ""


@dataclass(frozen=True)
class Prometheus:
    """What a Prometheus server answered: its URL, the JSON of ``/api/v1/targets`` and
    ``/api/v1/rules`` (None when not read), and ``error`` when it did not answer."""

    url: str
    targets: Mapping[str, Any] | None = None
    rules: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class LabSnapshot:
    """Everything a lab check may look at, read at one instant.

    ``health`` maps a service to its ``/health`` JSON (missing when it did not answer);
    ``prometheus`` is None unless one was asked for; ``locust`` holds the rows of a locust
    stats CSV (None when none was given) and ``locust_error`` why it could not be read.
    """

    network: Snapshot
    health: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    prometheus: Prometheus | None = None
    locust: Sequence[Mapping[str, str]] | None = None
    locust_error: str | None = None
    recovery: Recovery | None = None


@dataclass(frozen=True)
class Recovery:
    """Lab 7's facts: a backup, and the reconciliation of the restored databases against
    the clients' receipts (read by ``paylab lab check 7``, see shared/lab/backup.py).

    ``backup_error`` says why the backup does not verify (None: it does);
    ``approved_after`` are the RRNs of the approved receipts completed after the backup was
    taken, ``lost`` the RRNs reconciliation reports lost, ``other`` its other mismatches.
    """

    backup_dir: str
    backup_error: str | None = None
    ledger_id: str | None = None
    approved_after: frozenset[str] = frozenset()
    lost: frozenset[str] = frozenset()
    other: int = 0
    reconcile_error: str | None = None


@dataclass(frozen=True)
class Lab:
    """One lab of the course day: number, title, its page under ``docs/labs/``, its check."""

    number: int
    title: str
    page: str
    check: Callable[[LabSnapshot], list[Finding]]


# -- helpers ----------------------------------------------------------------------------------
def _missing(snap: LabSnapshot, source: str) -> str:
    """The hint for a source that did not answer."""
    reason = snap.network.errors.get(source, "not answering")
    return f"{source}: {reason}; is the network running (paylab up --chaos)?"


def _gateway(snap: LabSnapshot) -> Mapping[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    return snap.network.metrics.get("gateway")


def _links_healthy(snap: LabSnapshot, fix: str) -> Finding:
    what = "every link of the gateway is healthy (GET /links: healthy = target)"
    links = snap.network.links
    if not links:
        return Finding(False, what, _missing(snap, "gateway /links"))
    sick = [
        f"{link.get('name')} {link.get('healthy')}/{link.get('target')}"
        for link in links
        if link.get("healthy") != link.get("target") or not link.get("target")
    ]
    if sick:
        return Finding(
            False, what, f"not yet: {', '.join(sick)}; {fix}, then wait a few heartbeats"
        )
    return Finding(True, what)


#: The gateway's breaker of billing, as ``paylab breaker status`` names it.
BILLING_BREAKER = "gateway/billing"


def _breaker_states(snap: LabSnapshot) -> dict[str, str]:
    """Each breaker of every service, as ``service/upstream``: its state from the
    ``/breakers`` answers, else from the services' metrics."""
    states = {
        f"{b.get('service') or 'gateway'}/{b.get('name')}": str(b.get("state"))
        for b in snap.network.breakers or []
        if "name" in b
    }
    if states:
        return states
    for service in NETWORK_SERVICES:
        samples = snap.network.metrics.get(service)
        for labels, value in select(samples or {}, "paylab_breaker_state"):
            if value >= 1:
                states[f"{service}/{labels.get('upstream', '?')}"] = labels.get("state", "?")
    return states


def _breakers_closed(snap: LabSnapshot, names: Sequence[str] | None = None) -> Finding:
    label = "the billing breaker is" if names == (BILLING_BREAKER,) else "every breaker is"
    what = f"{label} closed now (paylab breaker status)"
    states = _breaker_states(snap)
    if not states:
        return Finding(False, what, _missing(snap, "gateway /breakers"))
    wanted = names or tuple(sorted(states))
    not_closed = [f"{n} {states.get(n, 'unknown')}" for n in wanted if states.get(n) != "closed"]
    if not_closed:
        return Finding(
            False,
            what,
            f"now: {', '.join(not_closed)}; remove the fault (paylab chaos heal all, "
            "paylab chaos database billing --up) and wait a few seconds for a probe to "
            "succeed, or `paylab breaker reset NAME`",
        )
    return Finding(True, what)


def _saf_counts(snap: LabSnapshot) -> Mapping[str, Any] | None:
    if snap.network.saf is not None and isinstance(snap.network.saf.get("counts"), Mapping):
        counts: Mapping[str, Any] = snap.network.saf["counts"]
        return counts
    gw = _gateway(snap)
    if gw is None:
        return None
    counts = {labels.get("state", "?"): v for labels, v in select(gw, "paylab_saf_entries")}
    return counts or None


def _queue_findings(snap: LabSnapshot) -> list[Finding]:
    empty = "the store-and-forward queue is empty (nothing queued or in flight)"
    no_dead = "no dead entries in the queue"
    counts = _saf_counts(snap)
    if counts is None:
        hint = _missing(snap, "gateway /saf/stats")
        return [Finding(False, empty, hint), Finding(False, no_dead, hint)]
    depth = int(counts.get("queued", 0) or 0) + int(counts.get("in_flight", 0) or 0)
    dead = int(counts.get("dead", 0) or 0)
    return [
        Finding(
            depth == 0,
            empty,
            ""
            if depth == 0
            else f"{depth} entries still to deliver: heal billing (paylab chaos heal all) "
            "and watch `paylab saf stats` drain",
        ),
        Finding(
            dead == 0,
            no_dead,
            ""
            if dead == 0
            else f"{dead} dead: `paylab saf list --state dead`, then `paylab saf retry ID` "
            "(or `paylab saf cancel ID`)",
        ),
    ]


# -- the labs ---------------------------------------------------------------------------------
def check_retry(snap: LabSnapshot) -> list[Finding]:
    """Lab 1: the gateway retried at least once, and every link is healthy again."""
    what = "the gateway has retried a call to billing (paylab_upstream_retries_total)"
    gw = _gateway(snap)
    if gw is None:
        retried = Finding(False, what, _missing(snap, "gateway"))
    else:
        retries = total(gw, "paylab_upstream_retries_total", upstream="billing")
        retried = Finding(
            retries > 0,
            what if retries <= 0 else f"{what}: {retries:.0f}",
            ""
            if retries > 0
            else "none yet: take billing's database down "
            "(paylab chaos database billing --down) and run `paylab inquire --bill PLN-0002`",
        )
    findings = [retried, _links_healthy(snap, "paylab chaos heal all")]
    findings.append(_database_up(snap, "billing"))
    return findings


def _database_up(snap: LabSnapshot, service: str) -> Finding:
    what = f"{service}'s database is up (no injected database fault)"
    chaos = snap.network.chaos
    if chaos is None:
        health = snap.health.get(service)
        deps = health.get("dependencies") if health else None
        db = deps.get("database") if isinstance(deps, Mapping) else None
        if isinstance(db, Mapping):
            ok = bool(db.get("ok"))
            return Finding(ok, what, "" if ok else f"{service} /health: {db.get('detail')}")
        return Finding(False, what, _missing(snap, "chaos"))
    state = (chaos.get("database") or {}).get(service)
    down = isinstance(state, Mapping) and bool(state.get("down"))
    return Finding(not down, what, f"paylab chaos database {service} --up" if down else "")


def check_breaker(snap: LabSnapshot) -> list[Finding]:
    """Lab 2: the gateway's billing breaker has been open and half-open at least once;
    closed now."""
    gw = _gateway(snap)
    findings = []
    for state, how in (
        ("open", "cut the link (paylab chaos partition billing) and inquire twice (step 4)"),
        ("half_open", "heal the link (paylab chaos heal all): a probe succeeds (step 6)"),
        ("closed", "heal the link (paylab chaos heal all) and wait a few seconds"),
    ):
        what = (
            f"the billing breaker went {state.replace('_', '-')} (paylab_breaker_transitions_total)"
        )
        if gw is None:
            findings.append(Finding(False, what, _missing(snap, "gateway")))
            continue
        count = total(gw, "paylab_breaker_transitions_total", upstream="billing", to_state=state)
        findings.append(Finding(count > 0, what, "" if count > 0 else f"never yet: {how}"))
    findings.append(_breakers_closed(snap, (BILLING_BREAKER,)))
    return findings


def check_saf(snap: LabSnapshot) -> list[Finding]:
    """Lab 3: payments approved in stand-in, their advices delivered, the queue empty."""
    gw = _gateway(snap)
    standin = 'payments were approved in stand-in (paylab_standin_total{outcome="approved"})'
    delivered = (
        'advices were delivered to billing (paylab_saf_forwarded_total{kind="advice",state="done"})'
    )
    if gw is None:
        hint = _missing(snap, "gateway")
        findings = [Finding(False, standin, hint), Finding(False, delivered, hint)]
    else:
        approved = total(gw, "paylab_standin_total", outcome="approved")
        done = total(gw, "paylab_saf_forwarded_total", kind="advice", state="done")
        findings = [
            Finding(
                approved > 0,
                standin,
                ""
                if approved > 0
                else "none yet: partition billing "
                "(paylab chaos partition billing) and pay (step 3)",
            ),
            Finding(
                done > 0,
                delivered,
                ""
                if done > 0
                else "none yet: heal billing (paylab chaos heal all) and wait for the forwarder",
            ),
        ]
    return findings + _queue_findings(snap)


def _prometheus_list(body: Mapping[str, Any] | None, *keys: str) -> list[Mapping[str, Any]]:
    node: Any = body
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return [i for i in node if isinstance(i, Mapping)] if isinstance(node, list) else []


def check_monitoring(snap: LabSnapshot) -> list[Finding]:
    """Lab 4: a Prometheus answers, scrapes the four services (up), has the alert rules."""
    prom = snap.prometheus
    answers = "Prometheus answers"
    targets_what = "Prometheus scrapes the four paylab services and they are up"
    rules_what = "the paylab alert rules are loaded (deploy/prometheus/alerts.yml)"
    start = (
        "start it (step 2): prometheus --config.file=deploy/prometheus/prometheus.local.yml "
        "--storage.tsdb.path=var/prometheus"
    )
    if prom is None or prom.error is not None:
        why = (prom.error if prom else None) or "not asked"
        url = prom.url if prom else "--prometheus-url"
        return [
            Finding(False, answers, f"{url}: {why}; {start}"),
            Finding(False, targets_what, "needs Prometheus"),
            Finding(False, rules_what, "needs Prometheus"),
        ]
    findings = [Finding(True, f"{answers} at {prom.url}")]
    up: dict[str, bool] = {}
    for target in _prometheus_list(prom.targets, "data", "activeTargets"):
        labels = target.get("labels")
        service = labels.get("service") if isinstance(labels, Mapping) else None
        if service in NETWORK_SERVICES:
            up[str(service)] = up.get(str(service), False) or target.get("health") == "up"
    missing = [s for s in NETWORK_SERVICES if s not in up]
    down = [s for s in NETWORK_SERVICES if s in up and not up[s]]
    if missing:
        findings.append(
            Finding(
                False,
                targets_what,
                f"no target labelled service={', '.join(missing)}: is Prometheus using "
                "deploy/prometheus/prometheus.local.yml (or the compose file's)?",
            )
        )
    elif down:
        findings.append(
            Finding(
                False,
                targets_what,
                f"down: {', '.join(down)}; is the network running, on the ports of the "
                "config? (Status > Targets shows the scrape error)",
            )
        )
    else:
        findings.append(Finding(True, targets_what))
    names = {
        str(rule.get("name"))
        for group in _prometheus_list(prom.rules, "data", "groups")
        for rule in _prometheus_list(group, "rules")
        if rule.get("type", "alerting") == "alerting"
    }
    absent = [a for a in EXPECTED_ALERTS if a not in names]
    findings.append(
        Finding(
            not absent,
            rules_what,
            ""
            if not absent
            else f"missing: {', '.join(absent)}; the config's rule_files must name "
            "alerts.yml (check with promtool check config)",
        )
    )
    return findings


def parse_locust_stats(text: str) -> list[dict[str, str]]:
    """The rows of a locust ``PREFIX_stats.csv``; raises ``ValueError`` if it is not one."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"Name", "Request Count", "Failure Count"} <= set(rows[0]):
        raise ValueError("not a locust stats CSV (no Name, Request Count, Failure Count)")
    return rows


def _count(value: str | None) -> int:
    try:
        return int(float(value or "0"))
    except ValueError:
        return 0


def check_load(snap: LabSnapshot) -> list[Finding]:
    """Lab 5: the gateway served enough requests, few network errors, and (with a locust
    CSV) locust saw no failure."""
    gw = _gateway(snap)
    served = f"the gateway answered at least {LOAD_MIN_REQUESTS} requests"
    mostly = (
        f"network errors (68, 91, 96) are at most {LOAD_MAX_ERROR_RATIO:.0%} of the "
        "gateway's 0200 answers, with approvals among them"
    )
    findings: list[Finding] = []
    if gw is None:
        hint = _missing(snap, "gateway")
        findings += [Finding(False, served, hint), Finding(False, mostly, hint)]
    else:
        requests = sum(
            v
            for labels, v in select(gw, "paylab_iso_requests_total")
            if labels.get("mti") not in ("0800", "NC")
        )
        findings.append(
            Finding(
                requests >= LOAD_MIN_REQUESTS,
                f"{served} ({requests:.0f})",
                ""
                if requests >= LOAD_MIN_REQUESTS
                else "run the locust step (step 2) against this network",
            )
        )
        codes: dict[str, float] = {}
        for labels, v in select(gw, "paylab_iso_requests_total", mti="0200"):
            codes[labels.get("code", "??")] = codes.get(labels.get("code", "??"), 0.0) + v
        answered = sum(codes.values())
        errors = sum(v for c, v in codes.items() if c in ERROR_CODES)
        ratio = errors / answered if answered else 0.0
        ok = answered > 0 and ratio <= LOAD_MAX_ERROR_RATIO and codes.get("00", 0) > 0
        detail = f" ({ratio:.1%} errors, {codes.get('00', 0):.0f} approved)" if answered else ""
        findings.append(
            Finding(
                ok,
                mostly + detail,
                ""
                if ok
                else "no 0200 answers yet"
                if not answered
                else "too many errors or no approval: fewer users, no fault left on "
                "(paylab chaos status), a fresh var/ for 00s; see the lab's questions",
            )
        )
    if snap.locust_error is not None:
        findings.append(Finding(False, "the locust report is readable", snap.locust_error))
    elif snap.locust is not None:
        agg = next((r for r in snap.locust if r.get("Name") == "Aggregated"), None)
        what = "locust saw no failure (Aggregated row of the stats CSV)"
        if agg is None:
            findings.append(Finding(False, what, "no Aggregated row: did locust finish?"))
        else:
            count, failed = _count(agg.get("Request Count")), _count(agg.get("Failure Count"))
            ok = count > 0 and failed == 0
            findings.append(
                Finding(
                    ok,
                    f"{what}: {count} requests, {failed} failures",
                    ""
                    if ok
                    else "see PREFIX_failures.csv for the reasons"
                    if failed
                    else "no request",
                )
            )
    return findings


def check_chaos(snap: LabSnapshot) -> list[Finding]:
    """Lab 6: faults were injected, none is left on, breakers closed, links healthy, the
    queue empty."""
    chaos = snap.network.chaos
    injected = "faults were injected (bytes dropped, resets, database refusals or a flood)"
    cleared = "no fault is left on (paylab chaos status)"
    findings: list[Finding] = []
    if chaos is None:
        hint = _missing(snap, "chaos") + " (the controller needs `paylab up --chaos`)"
        findings += [Finding(False, injected, hint), Finding(False, cleared, hint)]
    else:
        links = [link for link in chaos.get("links") or [] if isinstance(link, Mapping)]
        dbs = chaos.get("database") if isinstance(chaos.get("database"), Mapping) else {}
        assert isinstance(dbs, Mapping)
        evidence = sum(
            float(link.get(k) or 0) for link in links for k in ("bytes_dropped", "resets")
        )
        evidence += sum(
            float(s.get("refused") or 0) for s in dbs.values() if isinstance(s, Mapping)
        )
        flood = chaos.get("flood") is not None
        ok = evidence > 0 or flood
        findings.append(
            Finding(
                ok,
                injected,
                ""
                if ok
                else "none seen by this controller (its counters start at zero with "
                "`paylab up --chaos`): run steps 2 to 5",
            )
        )
        left = [
            f"{link.get('name')}: "
            + ("partitioned" if link.get("partitioned") else fault_text(link.get("faults")))
            for link in links
            if link.get("partitioned") or fault_text(link.get("faults"))
        ]
        left += [
            f"{name} database down"
            for name, s in dbs.items()
            if isinstance(s, Mapping) and s.get("down")
        ]
        findings.append(
            Finding(
                not left,
                cleared,
                ""
                if not left
                else f"still on: {'; '.join(left)}; paylab chaos heal all, "
                "paylab chaos database SERVICE --up",
            )
        )
    findings.append(_breakers_closed(snap))
    findings.append(_links_healthy(snap, "paylab chaos heal all"))
    return findings + _queue_findings(snap)


def check_recovery(snap: LabSnapshot) -> list[Finding]:
    """Lab 7: the network runs on the restored ledger, and reconciliation with the clients'
    receipts explains exactly the payments approved after the backup as lost."""
    rec = snap.recovery
    if rec is None:
        return [Finding(False, "a backup to check", "give it: paylab lab check 7 --backup DIR")]
    found = [
        Finding(
            rec.backup_error is None,
            f"the backup {rec.backup_dir} verifies against its manifest",
            rec.backup_error or "",
        )
    ]
    billing = json.dumps(snap.health.get("billing", {}))
    found.append(
        Finding(
            rec.ledger_id is not None and rec.ledger_id in billing,
            f"billing serves the backup's ledger {rec.ledger_id}",
            "restore the backup into the stopped network (paylab db restore DIR), then start "
            "it (paylab up)",
        )
    )
    if rec.reconcile_error is not None:
        found.append(Finding(False, "reconciliation with the receipts", rec.reconcile_error))
        return found
    found.append(
        Finding(
            bool(rec.approved_after),
            f"payments approved after the backup: {len(rec.approved_after)}",
            "pay a few bills after the backup, keeping each answer in the receipts file",
        )
    )
    found.append(
        Finding(
            rec.lost == rec.approved_after,
            f"reconciliation reports lost exactly those payments ({len(rec.lost)} lost)",
            "the lost payments must be the receipts completed after the backup: was the "
            "restore from that backup, and the receipts file complete?",
        )
    )
    found.append(
        Finding(
            rec.other == 0,
            f"nothing else mismatched ({rec.other})",
            "paylab reconcile --receipts FILE shows the other mismatches",
        )
    )
    return found


LABS: Mapping[int, Lab] = {
    lab.number: lab
    for lab in (
        Lab(1, "Retry and backoff", "01-retry-and-backoff.md", check_retry),
        Lab(2, "Circuit breaker", "02-circuit-breaker.md", check_breaker),
        Lab(3, "Store-and-forward", "03-store-and-forward.md", check_saf),
        Lab(4, "Monitoring with Prometheus and Grafana", "04-monitoring.md", check_monitoring),
        Lab(5, "Load testing with locust", "05-load-testing.md", check_load),
        Lab(6, "Chaos", "06-chaos.md", check_chaos),
        Lab(7, "Backup and recovery", "07-backup-and-recovery.md", check_recovery),
    )
}


def check(number: int, snap: LabSnapshot) -> list[Finding]:
    """The findings of lab ``number``; ``KeyError`` for an unknown lab."""
    return LABS[number].check(snap)
