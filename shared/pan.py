"""Primary account number helpers: Luhn, masking, keyed hashing.

A PAN never reaches a log or a database in clear: logs get :func:`mask_pan`, databases
get :func:`mask_pan` for display plus :class:`PanHasher` for lookups.
"""

from __future__ import annotations

import hashlib
import hmac


def luhn_ok(pan: str) -> bool:
    """True when ``pan`` is all digits, 12-19 long, and passes the Luhn check."""
    if not (pan.isascii() and pan.isdigit() and 12 <= len(pan) <= 19):
        return False
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def luhn_digit(partial: str) -> str:
    """The check digit that makes ``partial + digit`` pass the Luhn check."""
    for d in "0123456789":
        if luhn_ok(partial + d):
            return d
    raise ValueError("partial PAN must be 11-18 digits")  # pragma: no cover - unreachable


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits, the rest as ``*`` (PCI DSS display rule).

    Short or odd values are masked entirely rather than risk showing too much.
    """
    if len(pan) < 13:
        return "*" * len(pan)
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def account_number_12(pan: str) -> str:
    """The 12 rightmost PAN digits excluding the check digit (PIN block and HSM account field)."""
    return pan[-13:-1].rjust(12, "0")


class PanHasher:
    """Keyed hash of a PAN (HMAC-SHA256, hex), for lookups without storing the PAN."""

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes) -> None:
        # Keyed once: copying the keyed state is cheaper than keying HMAC again per call.
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def __call__(self, pan: str) -> str:
        mac = self._keyed.copy()
        mac.update(pan.encode("ascii"))
        return mac.hexdigest()
