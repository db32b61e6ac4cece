"""Stand-in: the gateway approves a payment on billing's behalf while billing is away.

Pure rules, no I/O. A payment may be approved in stand-in when the policy allows it, the
amount is within ``standin_max_amount`` and the card's stand-in total for the UTC day stays
within ``standin_customer_daily_amount``. The answer is 00 with the **stand-in marker**
in field 38: ``SI`` followed by four digits of the queue entry (a biller's approval code is
six digits, so the two never look alike). A 0220 advice is queued for billing, which
posts it when it is back (and may still decline it: reconciliation reports that).

The PIN cannot be verified in stand-in (billing holds the PIN verification data), which is
exactly why the amounts are bounded. Inquiries never get stand-in: there is no bill data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from shared.iso.codes import RC
from shared.iso.messages import (
    MTI_ADVICE,
    MTI_FINANCIAL,
    MTI_REVERSAL,
    PC_BILL_PAYMENT,
    Message,
    build_field90,
    transmission_datetime,
)
from shared.ops.settings import Settings

#: Field 38 of a stand-in approval starts with this.
STANDIN_MARKER = "SI"


@dataclass(frozen=True, slots=True)
class StandInPolicy:
    """The stand-in limits (see the module docstring)."""

    enabled: bool
    max_amount: int
    customer_daily_amount: int

    @classmethod
    def from_settings(cls, s: Settings) -> StandInPolicy:
        return cls(
            enabled=s.standin_policy == "standin",
            max_amount=s.standin_max_amount,
            customer_daily_amount=s.standin_customer_daily_amount,
        )

    def refusal(self, msg: Mapping[str, str], *, customer_total_today: int) -> str | None:
        """Why ``msg`` may not be approved in stand-in (None: it may)."""
        if not self.enabled:
            return "policy"
        if not is_payment(msg):
            return "not_a_payment"
        amount = int(msg["4"])
        if amount > self.max_amount:
            return "amount"
        if customer_total_today + amount > self.customer_daily_amount:
            return "customer_daily"
        return None


def is_payment(msg: Mapping[str, str]) -> bool:
    """True for a bill payment request (0200, processing code 500000)."""
    return msg.get("t") == MTI_FINANCIAL and msg.get("3") == PC_BILL_PAYMENT


def approval_code(entry_id: int) -> str:
    """Field 38 of a stand-in approval: the marker and four digits of the entry id."""
    return f"{STANDIN_MARKER}{entry_id % 10_000:04d}"


def is_standin_approval(response: Mapping[str, str]) -> bool:
    """True when an answer is a stand-in approval (00 with the marker in field 38)."""
    return response.get("39") == RC.APPROVED and response.get("38", "").startswith(STANDIN_MARKER)


def advice_of(payment: Mapping[str, str]) -> Message:
    """The 0220 advice that tells billing about a payment approved in stand-in.

    It keeps the payment's identity (fields 7, 11, 32, 41: the same idempotency key, so a
    late original and its advice are one transaction at billing) and drops what must never
    be stored: the PIN block (52) and the MAC (64/128).
    """
    advice = {k: v for k, v in payment.items() if k not in ("52", "64", "128")}
    advice["t"] = MTI_ADVICE
    return advice


#: Fields a gateway-made reversal carries over from the payment it undoes.
_REVERSAL_FIELDS = ("2", "3", "4", "11", "12", "13", "32", "37", "41", "42", "48", "49")


def reversal_of(payment: Mapping[str, str], now: datetime | None = None) -> Message:
    """The 0420 that undoes ``payment`` when its outcome is unknown (a 68).

    Field 90 names the original; field 7 is the reversal's own transmission time, so the
    reversal's idempotency key (32|41|11|7) differs from the payment's. No PIN, no MAC.
    """
    rev = {k: payment[k] for k in _REVERSAL_FIELDS if k in payment}
    rev["t"] = MTI_REVERSAL
    rev["7"] = transmission_datetime(now)
    if rev["7"] == payment.get("7"):  # same second as the original: keep the keys apart
        rev["7"] = transmission_datetime((now or datetime.now(UTC)) + timedelta(seconds=1))
    rev["90"] = build_field90(payment)
    return rev


def day_start(now: datetime) -> datetime:
    """Midnight UTC of ``now``'s day: the start of the per-customer stand-in window."""
    now = now.astimezone(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)
