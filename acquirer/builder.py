"""Building the acquirer's ISO-8583 requests, sans-IO.

The acquirer plays the bank side and its terminals: it holds the terminal keys of the
(test) key file in clear, as a terminal's secure module would, so it builds the PIN
block (ISO 9564 format 0 under the TPK) and the MAC (ISO 9797-1 algorithm 3 under the
TAK) itself. The gateway checks both through its HSM.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from shared import crypto
from shared.iso import codec
from shared.iso.messages import (
    MTI_FINANCIAL,
    MTI_REVERSAL,
    PC_BILL_INQUIRY,
    PC_BILL_PAYMENT,
    Message,
    StanCounter,
    build_field90,
    local_time_date,
    transmission_datetime,
)

__all__ = ["RequestBuilder", "StanCounter", "Terminal", "make_rrn"]


def make_rrn(stan: str, now: datetime) -> str:
    """Retrieval reference number: last digit of the year, day of year, hour, STAN (12)."""
    return f"{now.year % 10}{now.timetuple().tm_yday:03d}{now.hour:02d}{stan}"


@dataclass(frozen=True, slots=True)
class Terminal:
    """Identity and clear keys of the (simulated) terminal that originates requests."""

    acquirer_id: str
    terminal_id: str
    merchant_id: str
    currency: str
    tpk: bytes
    tak: bytes


class RequestBuilder:
    """Builds MACed requests for one terminal. Not thread-safe; one per event loop."""

    def __init__(self, terminal: Terminal, stans: StanCounter | None = None) -> None:
        self.terminal = terminal
        self._stans = stans or StanCounter()

    def _base(self, mti: str, pc: str, amount: int, bill: str) -> Message:
        now = datetime.now(UTC)
        stan = self._stans.next()
        t12, t13 = local_time_date()
        term = self.terminal
        return {
            "t": mti,
            "3": pc,
            "4": f"{amount:012d}",
            "7": transmission_datetime(now),
            "11": stan,
            "12": t12,
            "13": t13,
            "32": term.acquirer_id,
            "37": make_rrn(stan, now),
            "41": term.terminal_id,
            "42": term.merchant_id,
            "48": bill,
            "49": term.currency,
        }

    def inquiry(self, bill: str, pan: str | None = None) -> Message:
        msg = self._base(MTI_FINANCIAL, PC_BILL_INQUIRY, 0, bill)
        if pan:
            msg["2"] = pan
        return self.sign(msg)

    def payment(self, bill: str, amount: int, pan: str, pin: str) -> Message:
        msg = self._base(MTI_FINANCIAL, PC_BILL_PAYMENT, amount, bill)
        msg["2"] = pan
        msg["52"] = crypto.encrypt_pin_block(pin, pan, self.terminal.tpk)
        return self.sign(msg)

    def reversal(self, original: Mapping[str, str]) -> Message:
        """A 0420 undoing ``original`` (a payment 0200 this terminal sent)."""
        msg = self._base(MTI_REVERSAL, PC_BILL_PAYMENT, int(original["4"]), original["48"])
        msg["90"] = build_field90(original)
        return self.sign(msg)

    def sign(self, msg: Message) -> Message:
        """Add the MAC (field 64 or 128, per :func:`shared.iso.codec.mac_field`)."""
        field, data = codec.encode_for_mac(msg)
        msg[field] = crypto.mac_alg3(self.terminal.tak, data).hex().upper()
        return msg

    def response_mac_ok(self, raw: bytes, msg: Mapping[str, str]) -> bool:
        """Verify the gateway's MAC on a received response."""
        placed = codec.mac_input_of_received(raw, msg)
        if placed is None:
            return False
        mac, data = placed
        return secrets.compare_digest(
            crypto.mac_alg3(self.terminal.tak, data).hex().upper(), mac.upper()
        )
