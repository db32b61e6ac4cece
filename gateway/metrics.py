"""The gateway's own metrics: store-and-forward queue and stand-in.

Registered on the service's registry (``/metrics`` of the gateway), beside the common set
of :class:`shared.ops.metrics.ServiceMetrics`. Every labelled series is created up front, so a
dashboard shows zeros, not gaps, before the first outage.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.saf_rules import KIND_ADVICE, KIND_REVERSAL, SafState

KINDS = (KIND_ADVICE, KIND_REVERSAL)


class SafMetrics:
    """Queue depth by state, oldest age, and the flows in and out of the queue."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.entries = Gauge(
            "paylab_saf_entries",
            "Store-and-forward entries by state (refreshed every few seconds).",
            ["state"],
            registry=r,
        )
        self.oldest_age = Gauge(
            "paylab_saf_oldest_queued_age_seconds",
            "Age of the oldest entry still to deliver (0 when the queue is empty).",
            registry=r,
        )
        self.enqueued = Counter(
            "paylab_saf_enqueued",
            "Entries queued (advices after stand-in, reversals after a timeout).",
            ["kind"],
            registry=r,
        )
        self.forwarded = Counter(
            "paylab_saf_forwarded",
            "Delivery attempts by kind and the state they left the entry in "
            "(done, queued: retry later, dead). rate(done) is the drain rate.",
            ["kind", "state"],
            registry=r,
        )
        self.rejected = Counter(
            "paylab_saf_rejected",
            "Entries not queued: the queue was full (the payment was declined 91).",
            ["reason"],
            registry=r,
        )
        self.operator = Counter(
            "paylab_saf_operator_actions",
            "Operator actions on entries (retry, cancel, purge).",
            ["action"],
            registry=r,
        )
        self.late_responses = Counter(
            "paylab_saf_late_responses",
            "Answers from billing that came after their request timed out (reconciled).",
            registry=r,
        )
        self.standin = Counter(
            "paylab_standin",
            "Payments while billing was unavailable: approved in stand-in, or refused "
            "(policy, amount, customer_daily, queue_full).",
            ["outcome"],
            registry=r,
        )
        self.journal_failures = Counter(
            "paylab_journal_write_failures",
            "Journal rows that could not be committed (the database failed, e.g. disk full). "
            "An approval whose row cannot be written is withheld.",
            registry=r,
        )
        self.withheld = Counter(
            "paylab_approvals_withheld",
            "Billing approvals the gateway did not pass on because their journal row could "
            "not be written, by what became of the posting: reversal_queued, reversed_online, "
            "orphaned (the reversal failed too: reconciliation reports it), vetoed (the "
            "payment was already being reversed after a 68).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("reversal_queued", "reversed_online", "orphaned", "vetoed"):
            self.withheld.labels(outcome)
        for state in SafState:
            self.entries.labels(state.value)
        for kind in KINDS:
            self.enqueued.labels(kind)
            for state in (SafState.DONE, SafState.QUEUED, SafState.DEAD):
                self.forwarded.labels(kind, state.value)
        self.rejected.labels("full")
        for action in ("retry", "cancel", "purge"):
            self.operator.labels(action)
        for outcome in ("approved", "policy", "amount", "customer_daily", "queue_full"):
            self.standin.labels(outcome)
