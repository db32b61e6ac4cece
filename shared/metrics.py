"""Prometheus metrics, one registry per service instance.

A registry per service (not the global default) lets ``paylab up`` run four services in
one process, each with its own ``/metrics``, and lets tests start many networks side by
side. Names follow Prometheus conventions: ``paylab_`` prefix, base units, ``_total``.
Labels never carry a PAN, STAN, RRN or terminal id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.codes import RC

# Buckets reach the 2 s alert threshold and the upstream timeouts.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


class ServiceMetrics:
    """The RED set every service exposes, plus a few shared infrastructure counters."""

    def __init__(self, service: str, request_mtis: tuple[str, ...] = ()) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
