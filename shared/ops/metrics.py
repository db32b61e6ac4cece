"""Prometheus metrics, one registry per service instance.

A registry per service (not the global default) lets ``paylab up`` run four services in
one process, each with its own ``/metrics``, and lets tests start many networks side by
side. Names follow Prometheus conventions: ``paylab_`` prefix, base units, ``_total``.
Labels never carry a PAN, STAN, RRN or terminal id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.iso.codes import RC
from shared.store.db import DatabaseError

R = TypeVar("R")

# No ``*_created`` series: nothing reads them, and they would double every counter's series.
disable_created_metrics()

# Buckets reach the 2 s alert threshold and the upstream timeouts.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)

#: Payment amounts in minor units of the currency (field 4): 100.00 up to 10 000 000.00.
AMOUNT_BUCKETS = (
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
)

#: The ``biller`` label when the biller is not known: the bill does not exist, or the
#: payment was declined (card, PIN, HSM, database) before its bill was read.
UNKNOWN_BILLER = "unknown"

#: The ``source`` label of payments: online (0200) or an advice (0220/0221) of a payment the
#: gateway approved in stand-in.
PAYMENT_SOURCES = ("online", "advice")

#: ``hour`` label values (UTC hour of day), pre-created so the by-hour panel has 24 bars.
HOURS = tuple(f"{h:02d}" for h in range(24))

#: Failures of a database call that count as "database problems": the stores' own
#: :class:`~shared.store.db.DatabaseError` and SQLAlchemy's connection-level errors.
DB_FAILURES: tuple[type[BaseException], ...] = (DatabaseError, OperationalError, InterfaceError)


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


def series(metric: _Metric) -> Callable[..., _Metric]:
    """``metric.labels`` with each child remembered: on a per-message path the label
    lookup (a lock and a dict of tuples) costs more than the increment it serves.

    For metrics whose label sets are small and bounded (MTIs, codes, upstream names) and
    are never removed; at most 1,024 children are remembered, beyond that it is a plain
    lookup again.
    """
    return lru_cache(maxsize=1024)(metric.labels)


class ServiceMetrics:
    """The RED set every service exposes, plus a few shared infrastructure counters."""

    def __init__(self, service: str, request_mtis: tuple[str, ...] = ()) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # CPU, memory, open fds and start time of the process (process_*), and the Python
        # version (python_info): per service when each runs as its own process.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "paylab_iso_requests",
            "ISO-8583 (or HSM) requests answered, by request MTI and response code.",
            ["mti", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "paylab_iso_request_duration_seconds",
            "Time from a whole request frame to its answer being written.",
            ["mti"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_progress = Gauge(
            "paylab_iso_requests_in_progress", "Requests being processed now.", registry=r
        )
        self.frames_rejected = Counter(
            "paylab_iso_frames_rejected",
            "Frames not served: undecodable, framing (bad or oversize length), invalid.",
            ["reason"],
            registry=r,
        )
        self.handler_errors = Counter(
            "paylab_iso_handler_errors",
            "Requests whose handling failed unexpectedly (a bug): logged, left unanswered.",
            registry=r,
        )
        self.connections = Gauge(
            "paylab_tcp_connections", "Open TCP connections on the ISO listener.", registry=r
        )
        self.upstream_calls = Counter(
            "paylab_upstream_calls",
            "Calls to an upstream service by outcome (ok, timeout, unavailable).",
            ["upstream", "outcome"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "paylab_upstream_call_duration_seconds",
            "Round trip of one upstream call.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.unmatched_responses = Counter(
            "paylab_upstream_unmatched_responses",
            "Responses from upstream that matched no request in flight (late or unknown).",
            ["upstream"],
            registry=r,
        )
        # -- upstream links: pool, heartbeats, retries, circuit breaker -------------------
        self.upstream_connections = Gauge(
            "paylab_upstream_connections",
            "Connection slots of an upstream pool by state (healthy, connecting, waiting...).",
            ["upstream", "state"],
            registry=r,
        )
        self.upstream_in_flight = Gauge(
            "paylab_upstream_in_flight",
            "Requests sent to an upstream and not answered yet.",
            ["upstream"],
            registry=r,
        )
        self.echo_rtt = Histogram(
            "paylab_upstream_echo_rtt_seconds",
            "Round trip of heartbeat echoes (0800/301, or the HSM's NC).",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.heartbeat_failures = Counter(
            "paylab_upstream_heartbeat_failures",
            "Echoes not answered in time: each one replaces its connection.",
            ["upstream"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "paylab_upstream_retries",
            "Attempts repeated after a transient failure, by reason.",
            ["upstream", "reason"],
            registry=r,
        )
        self.upstream_rejected = Counter(
            "paylab_upstream_rejected",
            "Calls refused without touching the network (reason: breaker_open).",
            ["upstream", "reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "paylab_breaker_state",
            "1 for the circuit breaker's current state, 0 for the others.",
            ["upstream", "state"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "paylab_breaker_transitions",
            "Circuit breaker state changes, by the state entered.",
            ["upstream", "to_state"],
            registry=r,
        )
        # -- abuse and rate limits on the listener -----------------------------------------
        self.rate_limited = Counter(
            "paylab_rate_limited",
            "Requests refused by a rate limit (institution, terminal, customer).",
            ["limit"],
            registry=r,
        )
        self.connections_refused = Counter(
            "paylab_tcp_connections_refused",
            "Connections closed at accept: too many from one source address, or overall, "
            "or a failed TLS handshake (reason=tls).",
            ["reason"],
            registry=r,
        )
        self.connections_timed_out = Counter(
            "paylab_tcp_connections_timed_out",
            "ISO connections closed for slowness: a frame not whole within frame_timeout "
            "(frame), or nothing received within idle_timeout (idle).",
            ["reason"],
            registry=r,
        )
        # The per-message series, looked up once per label set (see :func:`series`).
        self.requests_of = series(self.requests)
        self.duration_of = series(self.duration)
        self.upstream_calls_of = series(self.upstream_calls)
        self.upstream_duration_of = series(self.upstream_duration)
        for reason in ("per_source", "total", "tls"):
            self.connections_refused.labels(reason)
        for reason in ("frame", "idle"):
            self.connections_timed_out.labels(reason)
        for reason in ("undecodable", "framing", "invalid"):
            self.frames_rejected.labels(reason)
        # Pre-create the common series so dashboards are not empty before traffic.
        for mti in request_mtis:
            self.duration.labels(mti)
            for code in (RC.APPROVED, RC.FORMAT_ERROR):
                self.requests.labels(mti, code.value)

    def render(self) -> bytes:
        """The text exposition of this registry."""
        return generate_latest(self.registry)


class DatabaseMetrics:
    """The database side of a service that has one (acquirer, gateway, billing).

    ``in_use`` and ``waiting`` are read at scrape time (no bookkeeping on the hot path):
    connections checked out of the SQLAlchemy pool, and calls queued for the service's
    database slot (one call at a time, see :meth:`shared.server.service.Service.in_db_thread`).
    :meth:`instrument` times one call and counts its failure.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        in_use: Callable[[], float],
        waiting: Callable[[], float],
    ) -> None:
        r = registry
        self.connections_in_use = Gauge(
            "paylab_db_connections_in_use",
            "Database connections checked out of the pool now.",
            registry=r,
        )
        self.connections_in_use.set_function(in_use)
        self.calls_waiting = Gauge(
            "paylab_db_calls_waiting",
            "Database calls waiting for the service's database slot (one call at a time).",
            registry=r,
        )
        self.calls_waiting.set_function(waiting)
        self.wait = Histogram(
            "paylab_db_wait_seconds",
            "Time a database call waited before it started (slot and worker thread).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "paylab_db_call_duration_seconds",
            "Time of one database call in its worker thread.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "paylab_db_errors",
            "Database calls (health pings included) that failed: unreachable, refused, "
            "broken connection, lock timeout.",
            registry=r,
        )

    def instrument(self, fn: Callable[..., R], *args: object) -> Callable[[], R]:
        """``fn(*args)`` wrapped for a worker thread: the wait from now until it starts and
        its duration are observed, and a database failure (:data:`DB_FAILURES`) is counted
        before it propagates. Call this when the call is requested, not when it runs."""
        asked = time.perf_counter()

        def call() -> R:
            began = time.perf_counter()
            self.wait.observe(began - asked)
            try:
                return fn(*args)
            except DB_FAILURES:
                self.errors.inc()
                raise
            finally:
                self.duration.observe(time.perf_counter() - began)

        return call


class BusinessMetrics:
    """What the biller sees: payments by biller and response code, amounts, inquiries.

    Only fresh outcomes count; a repeated request answered from the record (a replay) is
    counted in ``paylab_payment_replays_total`` instead, so approvals and amounts are never
    counted twice. ``biller`` is a short biller code from billing's bills (a small, fixed
    set) or :data:`UNKNOWN_BILLER`; never a bill number, PAN, STAN, RRN or terminal.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.payments = Counter(
            "paylab_payments",
            "Payments answered by billing, by biller, response code and source (online "
            "0200, or advice 0220/0221 of a stand-in approval). code=00 is an approval.",
            ["biller", "code", "source"],
            registry=r,
        )
        self.amount = Histogram(
            "paylab_payment_amount",
            "Amounts of approved (posted) payments, in minor units of the currency.",
            ["biller"],
            buckets=AMOUNT_BUCKETS,
            registry=r,
        )
        self.by_hour = Counter(
            "paylab_payments_by_hour",
            "Approved payments by UTC hour of day (00-23) of their approval.",
            ["hour"],
            registry=r,
        )
        self.replays = Counter(
            "paylab_payment_replays",
            "Repeated payments answered from the record (nothing posted again).",
            ["source"],
            registry=r,
        )
        self.inquiries = Counter(
            "paylab_bill_inquiries",
            "Bill inquiries by biller and response code (25: unknown bill).",
            ["biller", "code"],
            registry=r,
        )
        self.reversals = Counter(
            "paylab_payment_reversals",
            "Reversals answered by billing, by response code (00: the posting was undone).",
            ["code"],
            registry=r,
        )
        for hour in HOURS:
            self.by_hour.labels(hour)
        for source in PAYMENT_SOURCES:
            self.replays.labels(source)
        for code in (RC.APPROVED, RC.INVALID_TRANSACTION):
            self.reversals.labels(code.value)
        self.add_billers(())

        self._payments_of = series(self.payments)
        self._amount_of = series(self.amount)
        self._by_hour_of = series(self.by_hour)

    def add_billers(self, billers: Iterable[str]) -> None:
        """Pre-create the series of ``billers`` (and of the unknown biller's declines)."""
        for biller in billers:
            for source in PAYMENT_SOURCES:
                self.payments.labels(biller, RC.APPROVED.value, source)
            self.amount.labels(biller)
            self.inquiries.labels(biller, RC.APPROVED.value)
        for code in (RC.NO_SUCH_CARD, RC.WRONG_PIN, RC.UNKNOWN_BILL, RC.ISSUER_INOPERATIVE):
            self.payments.labels(UNKNOWN_BILLER, code.value, "online")
        self.inquiries.labels(UNKNOWN_BILLER, RC.UNKNOWN_BILL.value)

    def payment(self, source: str, code: str, biller: str | None, amount: int | None) -> None:
        """One fresh payment outcome; an approval with its ``amount`` adds to the amounts."""
        label = biller or UNKNOWN_BILLER
        self._payments_of(label, code, source).inc()
        if code == RC.APPROVED and amount is not None:
            self._amount_of(label).observe(amount)
            self._by_hour_of(HOURS[time.gmtime().tm_hour]).inc()
