"""The gateway's request rate limits (course: rate limiting and DDoS protection).

Token buckets per acquirer institution (field 32) and per terminal (field 41), and a
sliding window of payments per card (the customer, known by its keyed PAN hash). Plain
code with an injected clock; the gateway asks :meth:`RequestLimits.check` before doing any
work for a request and answers 65 when a limit says no, leaving the connection open.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from shared.iso.messages import PC_BILL_PAYMENT
from shared.ops.settings import Settings
from shared.resilience.ratelimit import KeyedRateLimiter, WindowCounter

#: The ``limit`` label values of ``paylab_rate_limited_total``.
LIMITS = ("institution", "terminal", "customer")


class RequestLimits:
    """Which limit (if any) a request breaks. Every limit can be switched off with 0."""

    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        burst = settings.rate_limit_burst
        self._institution = KeyedRateLimiter(
            settings.rate_limit_institution, settings.rate_limit_institution * burst, clock
        )
        self._terminal = KeyedRateLimiter(
            settings.rate_limit_terminal, settings.rate_limit_terminal * burst, clock
        )
        self._customer = WindowCounter(
            settings.rate_limit_customer_payments, settings.rate_limit_customer_window, clock
        )

    def check_request(self, msg: Mapping[str, str]) -> str | None:
        """The name of the request-rate limit ``msg`` exceeds, or None (it is counted)."""
        if not self._institution.allow(msg.get("32", "")):
            return "institution"
        if not self._terminal.allow(msg.get("41", "")):
            return "terminal"
        return None

    def check_payment(self, msg: Mapping[str, str], pan_hash: str | None) -> str | None:
        """``"customer"`` when this card made too many payments in the window, else None."""
        if pan_hash is None or msg.get("3") != PC_BILL_PAYMENT or msg.get("t") != "0200":
            return None
        return None if self._customer.allow(pan_hash) else "customer"
