"""Message-level vocabulary: MTIs, processing codes, network codes, and derived keys.

A decoded message is a ``dict[str, str]`` keyed like pyiso8583 (``"t"`` for the MTI,
``"2"``..``"128"`` for data elements). This module holds what every service needs to
reason about such a dict without I/O: which MTI answers which, the idempotency key,
the key that matches a response to its request on a multiplexed link, field 90.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime

from shared.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from shared.iso.codes import RC

Message = dict[str, str]

# MTIs used by paylab.
MTI_FINANCIAL = "0200"
MTI_FINANCIAL_RESP = "0210"
MTI_ADVICE = "0220"
MTI_ADVICE_REPEAT = "0221"
MTI_ADVICE_RESP = "0230"
MTI_REVERSAL = "0420"
MTI_REVERSAL_REPEAT = "0421"
MTI_REVERSAL_RESP = "0430"
MTI_NETWORK = "0800"
MTI_NETWORK_RESP = "0810"

REQUEST_MTIS = frozenset(
    {
        MTI_FINANCIAL,
        MTI_ADVICE,
        MTI_ADVICE_REPEAT,
        MTI_REVERSAL,
        MTI_REVERSAL_REPEAT,
        MTI_NETWORK,
    }
)

# Processing codes (field 3).
PC_BILL_INQUIRY = "310000"
PC_BILL_PAYMENT = "500000"
PROCESSING_CODES = frozenset({PC_BILL_INQUIRY, PC_BILL_PAYMENT})

# Network management information codes (field 70).
NMI_SIGN_ON = "001"
NMI_SIGN_OFF = "002"
NMI_ECHO = "301"
NMI_CODES = frozenset({NMI_SIGN_ON, NMI_SIGN_OFF, NMI_ECHO})

# Fields a response copies from its request (when present). 52 (PIN) and the MAC never are.
ECHOED_FIELDS = (
    "2",
    "3",
    "4",
    "7",
    "11",
    "12",
    "13",
    "32",
    "37",
    "41",
    "42",
    "48",
    "49",
    "70",
    "90",
)


def response_mti(mti: str) -> str:
    """The MTI answering ``mti``: 0200 -> 0210, 0221 -> 0230, 0421 -> 0430, 0800 -> 0810.

    Raises ValueError unless ``mti`` is four ASCII digits naming a request (third digit
    0, 2, 4, 6 or 8): a response has no response.
    """
    if len(mti) != 4 or not (mti.isascii() and mti.isdigit()) or mti[2] not in "02468":
        raise ValueError(f"not a request MTI: {mti!r}")
    return mti[:2] + str(int(mti[2]) + 1) + "0"


def is_response(mti: str) -> bool:
    """True for response MTIs (third digit odd: 0210, 0230, 0430, 0810)."""
    return len(mti) == 4 and mti[2] in "13579"


def is_repeat(mti: str) -> bool:
    """True for repeat MTIs (0221, 0421): a resend of something that may have arrived."""
    return len(mti) == 4 and mti[3] == "1"


def make_response(request: Mapping[str, str], code: str, **fields: str) -> Message:
    """A response to ``request`` with field 39 = ``code`` and the usual echoed fields.

    ``fields`` are added (or override echoed ones); a value of ``""`` removes the field.
    """
    resp: Message = {"t": response_mti(request["t"])}
    for f in ECHOED_FIELDS:
        v = request.get(f)
        if v is not None:
            resp[f] = v
    resp["39"] = code
    for k, v in fields.items():
        key = k.removeprefix("f")
        if v == "":
            resp.pop(key, None)
        else:
            resp[key] = v
    return resp


def match_key(msg: Mapping[str, str]) -> tuple[str, str, str]:
    """Key that pairs a response with its request on a multiplexed link.

    STAN (11) + terminal (41) + MTI class (the MTI's second digit: 2 financial, 4
    reversal, 8 network). 0200/0210 and 0220/0230 share class 2, so two requests of one
    terminal in flight with the same STAN are refused by the sender, not mismatched.
    """
    return (msg.get("11", ""), msg.get("41", ""), msg.get("t", "0000")[1])


def idempotency_key(msg: Mapping[str, str]) -> str:
    """The transaction's identity: acquirer (32) + terminal (41) + STAN (11) + date-time (7).

    A repeated request (same four values) must produce the original answer and no second
    posting. An advice (0220/0221) for a payment keeps the payment's key, which is what makes
    a stand-in advice and a late original the same transaction.
    """
    return "|".join((msg.get("32", ""), msg.get("41", ""), msg.get("11", ""), msg.get("7", "")))


def build_field90(original: Mapping[str, str]) -> str:
    """Field 90 (original data elements, n42) for a reversal of ``original``.

    original MTI (4) + original STAN (6) + original transmission date-time (10) +
    original acquirer institution (11, zero-filled) + forwarding institution (11 zeros).
    """
    return (
        original["t"]
        + original["11"]
        + original["7"]
        + original.get("32", "").rjust(11, "0")
        + "0" * 11
    )


def parse_field90(value: str) -> dict[str, str]:
    """Split field 90 into ``mti``, ``stan``, ``datetime`` and ``acquirer`` (zeros stripped)."""
    if len(value) != 42 or not value.isdigit():
        raise ValueError("field 90 must be 42 digits")
    return {
        "mti": value[0:4],
        "stan": value[4:10],
        "datetime": value[10:20],
        "acquirer": value[20:31].lstrip("0") or "0",
    }


def original_key(reversal: Mapping[str, str], acquirer_width: int | None = None) -> str:
    """Idempotency key of the transaction a reversal (0420/0421) undoes, from field 90 + 41.

    The acquirer id in field 90 is zero-filled to 11 digits; the original field 32 is
    recovered by taking the reversal's own field 32 when it matches (the usual case).
    """
    f90 = parse_field90(reversal["90"])
    acq = reversal.get("32", "")
    if acq.lstrip("0") != f90["acquirer"].lstrip("0"):
        acq = (
            f90["acquirer"]
            if acquirer_width is None
            else f90["acquirer"].rjust(acquirer_width, "0")
        )
    return "|".join((acq, reversal.get("41", ""), f90["stan"], f90["datetime"]))


def network_request(nmi: str, stan: str, now: datetime | None = None) -> Message:
    """A network management request (0800): sign-on 001, sign-off 002 or echo 301."""
    return {"t": MTI_NETWORK, "7": transmission_datetime(now), "11": stan, "70": nmi}


def transmission_datetime(now: datetime | None = None) -> str:
    """Field 7: MMDDhhmmss in UTC."""
    return (now or datetime.now(UTC)).strftime("%m%d%H%M%S")


def local_time_date(now: datetime | None = None) -> tuple[str, str]:
    """Fields 12 (hhmmss) and 13 (MMDD) in local time."""
    t = now or datetime.now().astimezone()
    return t.strftime("%H%M%S"), t.strftime("%m%d")


def changes_state(msg: Mapping[str, str]) -> bool:
    """False only for an inquiry: every other request may post or undo something upstream."""
    return not (msg.get("t") == MTI_FINANCIAL and msg.get("3") == PC_BILL_INQUIRY)


def failure_code(exc: UpstreamError, request: Mapping[str, str]) -> RC:
    """The response code for a request whose upstream call produced no answer.

    * nothing was sent (no link): 91;
    * sent, but no answer (timeout, or the link dropped after sending): 68 for anything that
      may have changed state upstream (the outcome is unknown), 91 for an inquiry (it
      changed nothing, so "inoperative" is the whole truth);
    * a request with the same match key already in flight on the link: 94.
    """
    if isinstance(exc, UpstreamUnavailable) and not exc.sent:
        return RC.ISSUER_INOPERATIVE
    if isinstance(exc, (UpstreamUnavailable, UpstreamTimeout)):
        return RC.LATE_RESPONSE if changes_state(request) else RC.ISSUER_INOPERATIVE
    return RC.DUPLICATE


class StanCounter:
    """System trace audit numbers 000001..999999, wrapping, starting at a random point.

    The random start keeps a restarted acquirer from reusing the STANs of the previous
    run in the same second (the idempotency key includes the transmission time too).
    """

    def __init__(self, start: int | None = None) -> None:
        self._n = start if start is not None else secrets.randbelow(999_999)

    def next(self) -> str:
        self._n = self._n % 999_999 + 1
        return f"{self._n:06d}"
