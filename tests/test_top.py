"""``paylab top``'s logic and drawing, without sockets: metrics text made by the services'
own metric classes (the same registries ``/metrics`` serves), admin answers as captured
from a running gateway."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from rich.console import Console

from gateway.metrics import SafMetrics
from shared.lab.top import (
    Snapshot,
    View,
    compute_view,
    fault_text,
    histogram_quantile,
    latency_row,
    parse_metrics,
    parse_seconds,
    total,
)
from shared.lab.top_view import render, summary_line
from shared.ops.metrics import ServiceMetrics

# Answers of a running gateway (GET /links, /breakers, /saf/stats), trimmed.
LINKS: dict[str, Any] = {
    "score": 100,
    "links": [
        {
            "name": "billing",
            "primary": "127.0.0.1:41253",
            "backup": None,
            "healthy": 2,
            "target": 2,
            "in_flight": 1,
            "capacity": 512,
            "active_endpoint": "primary",
            "last_echo_rtt_ms": None,
            "error_rate": 0.0,
            "calls_in_window": 2,
            "connections": [],
            "breaker": "closed",
        },
        {
            "name": "hsm",
            "primary": "127.0.0.1:43007",
            "backup": None,
            "healthy": 2,
            "target": 2,
            "in_flight": 0,
            "capacity": 512,
            "active_endpoint": "primary",
            "last_echo_rtt_ms": None,
            "error_rate": 0.0,
            "calls_in_window": 6,
            "connections": [],
            "breaker": "closed",
        },
    ],
}
BREAKERS: dict[str, Any] = {
    "breakers": [
        {
            "name": "billing",
            "state": "closed",
            "calls_in_window": 2,
            "failures_in_window": 0,
            "failure_rate": None,
            "consecutive_failures": 0,
            "open_remaining": 0.0,
            "opened_at": None,
            "rejected": 0,
            "stale": 0,
            "transitions": 0,
            "total_calls": 2,
            "total_failures": 0,
            "slow_calls": 0,
        },
        {
            "name": "hsm",
            "state": "closed",
            "calls_in_window": 6,
            "failures_in_window": 0,
            "failure_rate": None,
            "consecutive_failures": 0,
            "open_remaining": 0.0,
            "opened_at": None,
            "rejected": 0,
            "stale": 0,
            "transitions": 0,
            "total_calls": 6,
            "total_failures": 0,
            "slow_calls": 0,
        },
    ]
}
SAF = {
    "counts": {"queued": 0, "in_flight": 0, "done": 0, "dead": 0, "cancelled": 0},
    "depth": 0,
    "oldest_queued_age_seconds": None,
}
CHAOS = {
    "links": [
        {
            "name": "gateway",
            "listen": "127.0.0.1:1",
            "target": "127.0.0.1:2",
            "faults": {
                "latency": 0.0,
                "jitter": 0.0,
                "blackhole": 0.0,
                "reset": 0.0,
                "close_after": None,
                "bandwidth": None,
                "probability": 1.0,
            },
            "partitioned": False,
            "connections": 2,
        },
        {
            "name": "billing",
            "listen": "127.0.0.1:3",
            "target": "127.0.0.1:4",
            "faults": {
                "latency": 0.0,
                "jitter": 0.0,
                "blackhole": 1.0,
                "reset": 0.0,
                "close_after": None,
                "bandwidth": None,
                "probability": 1.0,
            },
            "partitioned": True,
            "connections": 2,
        },
        {
            "name": "hsm",
            "listen": "127.0.0.1:5",
            "target": "127.0.0.1:6",
            "faults": {
                "latency": 0.3,
                "jitter": 0.05,
                "blackhole": 0.0,
                "reset": 0.1,
                "close_after": None,
                "bandwidth": None,
                "probability": 1.0,
            },
            "partitioned": False,
            "connections": 4,
        },
    ],
    "database": {"billing": {"down": True}, "gateway": {"down": False}},
    "flood": None,
}


class Lab:
    """The four services' metric registries, driven by hand."""

    def __init__(self) -> None:
        self.acquirer = ServiceMetrics("acquirer", ("0200", "0420", "0800"))
        self.gateway = ServiceMetrics("gateway", ("0200", "0220", "0420", "0800"))
        self.saf = SafMetrics(self.gateway.registry)
        self.billing = ServiceMetrics("billing", ("0200", "0220", "0420", "0800"))
        self.hsm = ServiceMetrics("hsm", ("NC", "CA", "M6"))
        for svc, ups in ((self.acquirer, ("gateway",)), (self.gateway, ("billing", "hsm"))):
            for up in ups:
                svc.upstream_connections.labels(up, "healthy").set(2)
                svc.upstream_rejected.labels(up, "breaker_open")
                for state in ("closed", "open", "half_open", "forced_open", "disabled"):
                    svc.breaker_state.labels(up, state).set(1 if state == "closed" else 0)
        self.billing.upstream_connections.labels("hsm", "healthy").set(2)

    def pay(self, code: str, n: int = 1, *, standin: bool = False) -> None:
        self.acquirer.requests.labels("0200", code).inc(n)
        self.gateway.requests.labels("0200", code).inc(n)
        if standin:
            self.saf.standin.labels("approved").inc(n)
            self.saf.enqueued.labels("advice").inc(n)
        else:
            self.billing.requests.labels("0200", code).inc(n)
        self.gateway.requests.labels("0800", "00").inc(1)  # heartbeats: not traffic
        self.hsm.requests.labels("NC", "00").inc(1)

    def breaker(self, svc: ServiceMetrics, up: str, state: str) -> None:
        for s in ("closed", "open", "half_open", "forced_open", "disabled"):
            svc.breaker_state.labels(up, s).set(1 if s == state else 0)

    def texts(self, *down: str) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name in ("acquirer", "gateway", "billing", "hsm"):
            out[name] = None if name in down else getattr(self, name).render().decode()
        return out


def snap(lab: Lab, at: float, *down: str, **admin: Any) -> Snapshot:
    gateway_up = "gateway" not in down
    kwargs: dict[str, Any] = {
        "links": LINKS if gateway_up else None,
        "breakers": BREAKERS if gateway_up else None,
        "saf": SAF if gateway_up else None,
    }
    kwargs.update(admin)
    return Snapshot.build(at, lab.texts(*down), **kwargs)


def frame(view: View, caption: str | None = None, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None, force_terminal=False)
    console.print(render(view, caption))
    return console.export_text()


# -- parsing ------------------------------------------------------------------------------------
def test_parse_metrics_reads_a_real_exposition() -> None:
    lab = Lab()
    lab.pay("00", 3)
    samples = parse_metrics(lab.gateway.render().decode())
    assert total(samples, "paylab_iso_requests_total", mti="0200", code="00") == 3
    assert total(samples, "paylab_iso_requests_total", mti="0800") == 1
    assert total(samples, "paylab_standin_total", outcome="approved") == 0
    assert total(samples, "no_such_metric") == 0


def test_unreadable_metrics_are_an_error_of_that_service_not_a_crash() -> None:
    with pytest.raises(ValueError, match="unreadable metrics"):
        parse_metrics('paylab_x{code="00" 1\n')
    s = Snapshot.build(0.0, {"gateway": 'paylab_x{code="00" 1\n', "hsm": None})
    assert "unreadable" in s.errors["gateway"]
    assert s.errors["hsm"] == "not answering"
    assert s.metrics == {}


def test_admin_answers_of_the_wrong_shape_are_errors() -> None:
    s = Snapshot.build(0.0, {}, links={"nope": 1}, breakers=[1, 2], saf={"depth": 3}, chaos="text")
    assert set(s.errors) == {"gateway /links", "gateway /breakers", "gateway /saf/stats", "chaos"}
    assert s.links == [] and s.breakers == [] and s.saf is None and s.chaos is None


# -- the view -----------------------------------------------------------------------------------
def test_rates_and_codes_over_the_interval_and_in_total() -> None:
    lab = Lab()
    lab.pay("00", 10)
    lab.pay("55", 1)
    before = snap(lab, 100.0)
    lab.pay("00", 18)
    lab.pay("55", 1)
    lab.pay("25", 1)
    view = compute_view(before, snap(lab, 102.0))
    # 20 payments in 2 s; heartbeats and NC are not traffic.
    assert view.tps["acquirer"] == pytest.approx(10.0)
    assert view.tps["gateway"] == pytest.approx(10.0)
    rows = {r.code: (r.interval, r.total) for r in view.codes}
    assert rows == {"00": (18, 28), "55": (1, 2), "25": (1, 1)}
    assert view.codes_source == "acquirer"
    assert view.approvals(interval=True) == 18 and view.approvals(interval=False) == 28
    assert view.declines(interval=True) == 2 and view.declines(interval=False) == 3
    assert {r.code: r.meaning for r in view.codes}["55"] == "incorrect PIN"
    assert view.services == {"acquirer": True, "gateway": True, "billing": True, "hsm": True}
    assert not view.errors


def test_standin_links_breakers_and_drain() -> None:
    lab = Lab()
    lab.pay("00", 5)
    before = snap(lab, 0.0)
    lab.pay("00", 7, standin=True)
    lab.breaker(lab.gateway, "billing", "open")
    lab.gateway.upstream_connections.labels("billing", "healthy").set(0)
    lab.saf.forwarded.labels("advice", "done").inc(4)
    links = copy.deepcopy(LINKS)
    links["links"][0].update(healthy=0, breaker="open", in_flight=0)
    breakers = copy.deepcopy(BREAKERS)
    breakers["breakers"][0].update(state="open", open_remaining=1.6, rejected=7)
    saf = {
        "counts": {"queued": 5, "in_flight": 2, "done": 4, "dead": 1, "cancelled": 0},
        "depth": 7,
        "oldest_queued_age_seconds": 3.5,
    }
    view = compute_view(before, snap(lab, 2.0, links=links, breakers=breakers, saf=saf))
    assert (view.standin_interval, view.standin_total) == (7, 7)
    gw = {link.upstream: link for link in view.links if link.owner == "gateway"}
    assert gw["billing"].breaker == "open" and gw["billing"].healthy == 0
    assert gw["billing"].target == 2 and gw["billing"].open_remaining == 1.6
    assert gw["billing"].rejected == 7
    assert gw["hsm"].breaker == "closed" and gw["hsm"].open_remaining is None
    owners = [(link.owner, link.upstream) for link in view.links]
    assert owners == [("acquirer", "gateway"), ("gateway", "billing"), ("gateway", "hsm"),
                      ("billing", "hsm")]  # fmt: skip
    assert view.saf is not None
    assert (view.saf.queued, view.saf.in_flight, view.saf.dead, view.saf.depth) == (5, 2, 1, 7)
    assert view.saf.drain_rate == pytest.approx(2.0)
    assert view.saf.oldest_age == 3.5


def test_queue_from_metrics_when_the_admin_api_is_not_readable() -> None:
    lab = Lab()
    lab.saf.entries.labels("queued").set(9)
    lab.saf.entries.labels("dead").set(2)
    view = compute_view(snap(lab, 0.0, saf=None), snap(lab, 1.0, saf=None))
    assert view.saf is not None and (view.saf.queued, view.saf.dead) == (9, 2)


def test_a_restarted_service_counts_from_zero() -> None:
    lab = Lab()
    lab.pay("00", 50)
    before = snap(lab, 0.0)
    restarted = Lab()
    restarted.pay("00", 3)
    view = compute_view(before, snap(restarted, 1.0))
    assert view.tps["acquirer"] == pytest.approx(3.0)
    assert {r.code: r.interval for r in view.codes} == {"00": 3}


def test_a_service_down_is_shown_down_and_its_figures_unknown() -> None:
    lab = Lab()
    lab.pay("00", 2)
    before = snap(lab, 0.0)
    view = compute_view(before, snap(lab, 1.0, "gateway", "acquirer"), chaos_expected=False)
    assert view.services == {"acquirer": False, "gateway": False, "billing": True, "hsm": True}
    assert view.tps == {"acquirer": None, "gateway": None}
    assert view.codes == [] and view.codes_source is None
    assert view.saf is None and view.standin_total is None
    assert view.errors == {"acquirer": "not answering", "gateway": "not answering"}
    assert not view.all_down
    text = frame(view)
    assert "gateway down" in text and "acquirer down" in text
    assert "! not answering: acquirer, gateway" in text
    assert "at the -" not in text and "0200 answers (no source answering)" in text


def test_everything_down() -> None:
    nothing: dict[str, str | None] = dict.fromkeys(("acquirer", "gateway", "billing", "hsm"))
    view = compute_view(Snapshot.build(0.0, nothing), Snapshot.build(1.0, nothing))
    assert view.all_down
    assert view.errors == dict.fromkeys(nothing, "not answering")
    text = frame(view)
    assert "hsm down" in text
    # Every service is named, the HSM too (not cut at three errors), and no "at the -".
    assert "! not answering: acquirer, gateway, billing, hsm" in text
    assert "at the -" not in text


def test_zero_interval_gives_no_rates() -> None:
    lab = Lab()
    s = snap(lab, 5.0)
    view = compute_view(s, s)
    assert view.tps == {"acquirer": None, "gateway": None}
    assert view.saf is not None and view.saf.drain_rate is None


# -- chaos ----------------------------------------------------------------------------------------
def test_chaos_faults_per_link() -> None:
    lab = Lab()
    view = compute_view(snap(lab, 0.0, chaos=CHAOS), snap(lab, 1.0, chaos=CHAOS))
    assert view.chaos is not None
    rows = {c.link: c for c in view.chaos}
    assert rows["gateway"].faults == "" and not rows["gateway"].partitioned
    assert rows["billing"].partitioned and rows["billing"].faults == ""
    assert rows["hsm"].faults == "latency 300ms, jitter 50ms, reset 10%"
    assert rows["billing db"].faults == "down"
    assert "gateway db" not in rows
    text = frame(view)
    assert "PARTITIONED" in text
    assert "latency 300ms" in text
    assert "billing db: down" in text
    assert "partitioned billing" in summary_line(view)


def test_fault_text() -> None:
    assert fault_text(None) == ""
    assert fault_text({"probability": 1.0, "latency": 0.0}) == ""
    assert fault_text({"probability": 0.5}) == ""  # a probability of nothing is nothing
    assert fault_text({"bandwidth": 10000, "close_after": 1000, "probability": 0.5}) == (
        "bandwidth 10000B/s, close_after 1000B, probability 50%"
    )
    assert fault_text({"blackhole": 1.0}, partitioned=True) == ""
    assert fault_text({"blackhole": 0.3}) == "blackhole 30%"


def test_an_asked_for_chaos_controller_that_does_not_answer_is_an_error() -> None:
    lab = Lab()
    before = snap(lab, 0.0)
    now = Snapshot.build(1.0, lab.texts(), errors={"chaos": "not answering (timed out)"})
    assert compute_view(before, now, chaos_expected=True).errors == {
        "chaos": "not answering (timed out)"
    }
    assert compute_view(before, now, chaos_expected=False).errors == {}


# -- drawing --------------------------------------------------------------------------------------
def test_frame_shows_the_key_figures_and_fits_80x24() -> None:
    lab = Lab()
    lab.pay("00", 10)
    before = snap(lab, 0.0, chaos=CHAOS)
    lab.pay("00", 20)
    lab.pay("55", 2)
    lab.pay("00", 4, standin=True)
    view = compute_view(before, snap(lab, 1.0, chaos=CHAOS))
    text = frame(view, "billing partitioned: payments approved in stand-in and queued")
    for needle in (
        "paylab top",
        "billing partitioned: payments approved in stand-in and queued",
        "acquirer 26.0",
        "approved 24 (34)",
        "declined 2 (2)",
        "stand-in 4 (4)",
        "incorrect PIN",
        "gateway → billing",
        "2/2",
        "closed",
        "queue 0 waiting",
    ):
        assert needle in text, needle
    small = frame(view, "billing partitioned: payments approved in stand-in and queued", 80)
    lines = small.rstrip("\n").split("\n")
    assert len(lines) <= 24
    # Each line whole at 80 columns (rich would otherwise wrap it onto the next one).
    for whole in (
        "paylab top  every 1.0 s   ● acquirer ● gateway ● billing ● hsm",
        "last interval (total): approved 24 (34)  declined 2 (2)  stand-in 4 (4)",
        "queue 0 waiting (0 in flight)  dead 0  drain 0.0/s  delivered 0",
    ):
        assert any(line.rstrip() == whole for line in lines), (whole, small)


def test_many_codes_are_cut_to_the_most_frequent() -> None:
    lab = Lab()
    before = snap(lab, 0.0)
    for i, code in enumerate(("00", "05", "13", "14", "25", "55", "68", "91", "96")):
        lab.pay(code, 10 - i)
    text = frame(compute_view(before, snap(lab, 1.0)))
    assert "00 " in text and "96" not in text.split("links")[0]


def test_summary_line() -> None:
    lab = Lab()
    before = snap(lab, 0.0)
    lab.pay("00", 3)
    line = summary_line(compute_view(before, snap(lab, 1.0)), "steady", elapsed=4.0)
    assert line.startswith("  4.0s  tps 3.0")
    assert "approved 3/3" in line
    assert "breakers acquirer/gateway:closed,gateway/billing:closed,gateway/hsm:closed" in line
    assert line.endswith("| steady")


@pytest.mark.parametrize(
    ("text", "seconds"), [("1s", 1.0), ("500ms", 0.5), ("2", 2.0), (" 1.5 S ", 1.5), ("1m", 60.0)]
)
def test_parse_seconds(text: str, seconds: float) -> None:
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "fast", "0", "-1s", "nan", "inf"])
def test_parse_seconds_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_seconds(text)


def test_breakers_of_every_service_complete_their_rows() -> None:
    """``/breakers`` of every service (as fetched by ``paylab top``): the acquirer's and
    billing's breakers show with their state, time left open and refusals, as the gateway's."""
    lab = Lab()
    before = snap(lab, 0.0)
    lab.breaker(lab.acquirer, "gateway", "open")
    breakers = {
        "breakers": [
            *BREAKERS["breakers"],
            {"service": "acquirer", "name": "gateway", "state": "open", "open_remaining": 12.5,
             "rejected": 40},
            {"service": "billing", "name": "hsm", "state": "half_open", "rejected": 0},
        ]
    }  # fmt: skip
    view = compute_view(before, snap(lab, 1.0, breakers=breakers))
    rows = {(link.owner, link.upstream): link for link in view.links}
    acquirer = rows[("acquirer", "gateway")]
    assert (acquirer.breaker, acquirer.open_remaining, acquirer.rejected) == ("open", 12.5, 40)
    assert acquirer.healthy == 2  # from the metrics, kept
    assert rows[("billing", "hsm")].breaker == "half_open"
    assert rows[("gateway", "billing")].breaker == "closed"
    line = summary_line(view)
    assert "acquirer/gateway:open" in line and "billing/hsm:half_open" in line


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    inf = float("inf")
    # 10 requests: 5 under 10 ms, 4 more under 50 ms, 1 over 1 s.
    buckets = {0.01: 5.0, 0.05: 9.0, 1.0: 9.0, inf: 10.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.01 + 0.04 * 2 / 4)
    assert histogram_quantile(0.95, buckets) == pytest.approx(1.0)  # the +Inf bucket
    assert histogram_quantile(0.5, {0.01: 0.0, inf: 0.0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_latency_is_over_the_interval_else_since_start() -> None:
    inf = float("inf")
    before = {0.01: 4.0, 0.1: 4.0, inf: 4.0}
    now = {0.01: 4.0, 0.1: 8.0, inf: 8.0}
    row = latency_row("x", now, before)
    assert row.interval and row.count == 4
    assert row.p50 == pytest.approx(0.055) and row.p95 == pytest.approx(0.0955)
    idle = latency_row("x", now, now)
    assert not idle.interval and idle.count == 8
    assert latency_row("x", {}, {}).count == 0


def test_top_shows_p50_and_p95_of_real_histograms() -> None:
    lab = Lab()
    before = snap(lab, 0.0)
    for seconds in (0.004, 0.004, 0.004, 0.02, 0.3):
        lab.gateway.duration.labels("0200").observe(seconds)
        lab.acquirer.upstream_duration.labels("gateway").observe(seconds)
    view = compute_view(before, snap(lab, 1.0))
    rows = {r.label: r for r in view.latency}
    assert set(rows) == {"0200 at the gateway", "acquirer → gateway"}
    gw = rows["0200 at the gateway"]
    assert gw.interval and gw.count == 5
    assert gw.p50 is not None and gw.p50 <= 0.005
    assert gw.p95 is not None and 0.1 <= gw.p95 <= 0.5
    text = frame(view)
    assert "latency 0200 at the gateway p50" in text and "p95" in text
    assert re.search(r" p50 [\d.]+ms p95 [\d.]+ms ", summary_line(view))
