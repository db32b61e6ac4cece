"""The one table of ISO-8583 response codes (field 39) used everywhere in paylab.

Codes follow ISO 8583:1987 where a standard code fits; ``88`` is a private-use code for
bill payment. ``docs/message-spec.md`` reproduces this table; keep them in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RC(StrEnum):
    """Response codes (field 39)."""

    APPROVED = "00"
    DO_NOT_HONOR = "05"
    INVALID_TRANSACTION = "12"
    INVALID_AMOUNT = "13"
    NO_SUCH_CARD = "14"
    UNKNOWN_BILL = "25"
    FORMAT_ERROR = "30"
    WRONG_PIN = "55"
    SECURITY_VIOLATION = "63"
    ACTIVITY_LIMIT = "65"
    LATE_RESPONSE = "68"
    BILL_ALREADY_PAID = "88"
    ISSUER_INOPERATIVE = "91"
    DUPLICATE = "94"
    SYSTEM_MALFUNCTION = "96"


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """What a response code means and how a sender should treat it."""

    code: RC
    text: str
    #: The outcome is final: resending the same request cannot change it.
    final: bool
    #: A temporary condition of the network, not a business decision.
    transient: bool


CODE_TABLE: dict[RC, CodeInfo] = {
    info.code: info
    for info in (
        CodeInfo(RC.APPROVED, "approved", final=True, transient=False),
        CodeInfo(RC.DO_NOT_HONOR, "do not honour", final=True, transient=False),
        CodeInfo(RC.INVALID_TRANSACTION, "invalid transaction", final=True, transient=False),
        CodeInfo(RC.INVALID_AMOUNT, "invalid amount (does not match the bill)", True, False),
        CodeInfo(RC.NO_SUCH_CARD, "invalid card number (no such card)", True, False),
        CodeInfo(RC.UNKNOWN_BILL, "unable to locate record (unknown bill)", True, False),
        CodeInfo(RC.FORMAT_ERROR, "format error", final=True, transient=False),
        CodeInfo(RC.WRONG_PIN, "incorrect PIN", final=True, transient=False),
        CodeInfo(RC.SECURITY_VIOLATION, "security violation (MAC check failed)", True, False),
        # A rate limit said no: not a network fault (never retried by the gateway), but
        # not final either: the same request later may pass.
        CodeInfo(RC.ACTIVITY_LIMIT, "activity limit exceeded (rate limited)", False, False),
        CodeInfo(RC.LATE_RESPONSE, "response received too late (outcome unknown)", False, True),
        CodeInfo(RC.BILL_ALREADY_PAID, "bill already paid", final=True, transient=False),
        CodeInfo(RC.ISSUER_INOPERATIVE, "issuer or switch inoperative", False, True),
        CodeInfo(RC.DUPLICATE, "duplicate transmission", final=True, transient=False),
        CodeInfo(RC.SYSTEM_MALFUNCTION, "system malfunction", final=False, transient=True),
    )
}


def describe(code: str) -> str:
    """Human text for a response code; unknown codes are described as such, never raise."""
    try:
        return CODE_TABLE[RC(code)].text
    except ValueError:
        return f"unknown response code {code!r}"


def is_transient(code: str) -> bool:
    """True for codes that say "try again later" (91, 96, 68), false for business declines."""
    try:
        return CODE_TABLE[RC(code)].transient
    except ValueError:
        return False
