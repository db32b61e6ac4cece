"""Per-MTI validation of decoded messages, sans-IO.

:func:`validate_request` raises :class:`~shared.errors.ValidationError` naming the first
bad field. A receiver answers such a request with field 39 = 30 (format error) and keeps
the connection open. Rules are tables, so ``docs/message-spec.md`` can mirror them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from shared.errors import ValidationError
from shared.iso.messages import (
    MTI_ADVICE,
    MTI_ADVICE_REPEAT,
    MTI_FINANCIAL,
    MTI_NETWORK,
    MTI_REVERSAL,
    MTI_REVERSAL_REPEAT,
    NMI_CODES,
    PC_BILL_INQUIRY,
    PC_BILL_PAYMENT,
    PROCESSING_CODES,
)
from shared.pan import luhn_ok

_HEX16 = re.compile(r"[0-9A-Fa-f]{16}")
_BILL = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]{0,31}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def _digits(n: int | None = None) -> Callable[[str], bool]:
    if n is None:
        return lambda v: v.isascii() and v.isdigit()
    return lambda v: len(v) == n and v.isascii() and v.isdigit()


# Built once: a rule that called _digits(n) would build a new closure per message.
_ALL_DIGITS = _digits()
_DIGITS6 = _digits(6)
_DIGITS10 = _digits(10)


def _datetime10(v: str) -> bool:
    if not _DIGITS10(v):
        return False
    month, day, hh, mm, ss = int(v[0:2]), int(v[2:4]), int(v[4:6]), int(v[6:8]), int(v[8:10])
    return 1 <= month <= 12 and 1 <= day <= 31 and hh < 24 and mm < 60 and ss < 60


# Content rule and description per field; lengths are enforced by the spec already.
FIELD_RULES: dict[str, tuple[Callable[[str], bool], str]] = {
    "2": (luhn_ok, "PAN: 12-19 digits passing the Luhn check"),
    "3": (lambda v: v in PROCESSING_CODES, "processing code: 310000 or 500000"),
    "4": (_digits(12), "amount: 12 digits, minor units"),
    "7": (_datetime10, "transmission date-time: MMDDhhmmss"),
    "11": (lambda v: _DIGITS6(v) and v != "000000", "STAN: 6 digits, not all zero"),
    "12": (_digits(6), "local time: hhmmss"),
    "13": (_digits(4), "local date: MMDD"),
    "32": (lambda v: _ALL_DIGITS(v) and 1 <= len(v) <= 11, "acquirer institution: 1-11 digits"),
    "37": (lambda v: len(v) == 12 and v.isascii() and v.isalnum(), "RRN: 12 alphanumerics"),
    "39": (lambda v: len(v) == 2 and v.isascii() and v.isalnum(), "response code: 2 chars"),
    "41": (lambda v: len(v) == 8 and bool(_PRINTABLE.fullmatch(v)), "terminal: 8 characters"),
    "42": (lambda v: len(v) == 15 and bool(_PRINTABLE.fullmatch(v)), "merchant: 15 characters"),
    "48": (lambda v: bool(_BILL.fullmatch(v)), "bill number: letters, digits and '-'"),
    "49": (_digits(3), "currency: 3 digits (ISO 4217 numeric)"),
    "52": (lambda v: bool(_HEX16.fullmatch(v)), "PIN block: 16 hex digits"),
    "64": (lambda v: bool(_HEX16.fullmatch(v)), "MAC: 16 hex digits"),
    "70": (lambda v: v in NMI_CODES, "network code: 001, 002 or 301"),
    "90": (_digits(42), "original data elements: 42 digits"),
    "128": (lambda v: bool(_HEX16.fullmatch(v)), "MAC: 16 hex digits"),
}

_FINANCIAL_BASE = ("3", "4", "7", "11", "12", "13", "32", "37", "41", "48", "49")

#: Mandatory fields per request MTI (MAC and PIN are handled separately).
MANDATORY: dict[str, tuple[str, ...]] = {
    MTI_FINANCIAL: _FINANCIAL_BASE,
    MTI_ADVICE: (*_FINANCIAL_BASE, "2"),
    MTI_ADVICE_REPEAT: (*_FINANCIAL_BASE, "2"),
    MTI_REVERSAL: (*_FINANCIAL_BASE, "90"),
    MTI_REVERSAL_REPEAT: (*_FINANCIAL_BASE, "90"),
    MTI_NETWORK: ("7", "11", "70"),
}


def validate_request(msg: Mapping[str, str], *, require_mac: bool = False) -> None:
    """Check a decoded request. Raises :class:`ValidationError` on the first problem.

    * the MTI must be a request MTI paylab handles;
    * its mandatory fields must be present and every present field must satisfy its rule;
    * a payment 0200 must carry a PAN (2) and a PIN block (52); an inquiry needs
      neither (a bill can be looked up without a card); advices and reversals must not
      (a PIN is verified once, at the original authorisation);
    * with ``require_mac`` (the acquirer-to-gateway link), financial messages carry a MAC.
    """
    mti = msg.get("t", "")
    mandatory = MANDATORY.get(mti)
    if mandatory is None:
        raise ValidationError(f"unsupported MTI {mti!r}", field="t")
    for f in mandatory:
        if f not in msg:
            raise ValidationError(f"field {f} is mandatory for {mti}", field=f)
    for f, value in msg.items():
        rule = FIELD_RULES.get(f)
        if rule is not None and not rule[0](value):
            raise ValidationError(f"field {f} invalid ({rule[1]})", field=f)
    if mti == MTI_NETWORK:
        return
    pc = msg["3"]
    if mti == MTI_FINANCIAL and pc == PC_BILL_PAYMENT:
        if "2" not in msg:
            raise ValidationError("a bill payment needs a PAN (field 2)", field="2")
        if "52" not in msg:
            raise ValidationError("a bill payment needs a PIN block (field 52)", field="52")
    if "52" in msg and "2" not in msg:
        raise ValidationError("a PIN block (52) needs the PAN (2) it is bound to", field="2")
    if mti != MTI_FINANCIAL and pc != PC_BILL_PAYMENT:
        raise ValidationError(f"{mti} applies to bill payments (500000) only", field="3")
    if mti != MTI_FINANCIAL and "52" in msg:
        raise ValidationError(f"{mti} must not carry a PIN block", field="52")
    if pc == PC_BILL_INQUIRY and int(msg["4"]) != 0:
        raise ValidationError("an inquiry carries a zero amount", field="4")
    if pc == PC_BILL_PAYMENT and int(msg["4"]) == 0:
        raise ValidationError("a payment needs a positive amount", field="4")
    if require_mac and "64" not in msg and "128" not in msg:
        raise ValidationError("a MAC (field 64 or 128) is mandatory on this link", field="64")


def validate_response(msg: Mapping[str, str]) -> None:
    """Light check of a response from upstream: it must carry a 2-character field 39."""
    code = msg.get("39")
    if code is None or not FIELD_RULES["39"][0](code):
        raise ValidationError("response without a valid field 39", field="39")
