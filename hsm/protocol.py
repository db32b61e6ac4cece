"""Sans-IO client side of the HSM host protocol: build requests, parse and read responses.

Used by the gateway and billing. Builders return one request message *without* the 2-byte
length prefix (the transport adds it); :func:`parse_response` takes one response message
without it. See :mod:`hsm.commands` for the field layouts and error codes.

Builders raise :class:`~hsm.errors.HsmProtocolError` for arguments that do not fit the layout
(wrong length, non-hex, ...). Accessors raise :class:`~hsm.errors.HsmCommandError` when the HSM
reported an error, and :class:`~hsm.errors.HsmProtocolError` when the response is not the one
expected or its fields are malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from hsm.errors import HsmCommandError, HsmProtocolError

__all__ = [
    "KEY_TYPE_TAK",
    "KEY_TYPE_ZAK",
    "HsmResponse",
    "build_ca",
    "build_ec",
    "build_m6",
    "build_m8",
    "build_nc",
    "ca_result",
    "ec_verified",
    "m7_mac",
    "m9_verified",
    "nd_result",
    "parse_response",
]

KEY_TYPE_TAK: Final = "003"
"""M6/M8 key type code of a terminal authentication key."""
KEY_TYPE_ZAK: Final = "008"
"""M6/M8 key type code of a zone authentication key."""

_MAX_MESSAGE: Final = 0xFFFF
_HEADER = re.compile(r"[\x20-\x7e]{4}")
_KEY_REF = re.compile(r"U[0-9A-Fa-f]{32}")
_HEX16 = re.compile(r"[0-9A-Fa-f]{16}")
_CODE = re.compile(rb"[0-9A-Za-z]{2}")
_ERROR = re.compile(rb"[0-9]{2}")
_CB_FIELDS = re.compile(rb"([0-9]{2})([0-9A-F]{16})01")
_MAC_FIELD = re.compile(rb"[0-9A-F]{16}|[0-9A-F]{8}")
_ND_FIELDS = re.compile(rb"([0-9A-F]{16})([\x20-\x7e]*)")


@dataclass(frozen=True, slots=True)
class HsmResponse:
    """A parsed response: header, response code, error code and the raw fields after them."""

    header: str
    code: str
    error: str
    fields: bytes

    @property
    def ok(self) -> bool:
        """True when the error code is 00."""
        return self.error == "00"


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _check(value: str, pattern: re.Pattern[str], what: str) -> str:
    """``value`` upper-cased (only hex letters can change) if it matches ``pattern``."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise HsmProtocolError(f"{what} has the wrong format")
    return value.upper()


def _digits(value: str, n: int, what: str) -> str:
    if not isinstance(value, str) or len(value) != n or not all("0" <= c <= "9" for c in value):
        raise HsmProtocolError(f"{what} must be {n} decimal digits")
    return value


def _request(header: str, code: str, *fields: str) -> bytes:
    if not isinstance(header, str) or not _HEADER.fullmatch(header):
        raise HsmProtocolError("header must be 4 printable ASCII characters")
    return (header + code + "".join(fields)).encode("ascii")


def build_nc(header: str) -> bytes:
    """NC diagnostics / heartbeat request. ``header`` is 4 printable ASCII characters."""
    return _request(header, "NC")


def build_ca(
    header: str,
    tpk: str,
    zpk: str,
    pin_block: str,
    account12: str,
    *,
    max_pin_length: int = 12,
) -> bytes:
    """CA request: translate a format 0 ``pin_block`` (16H) from ``tpk`` to ``zpk``.

    ``tpk``/``zpk`` are key references ("U" + 32H); ``account12`` is the 12 rightmost PAN
    digits excluding the check digit; ``max_pin_length`` is 4..12.
    """
    if not isinstance(max_pin_length, int) or not 4 <= max_pin_length <= 12:
        raise HsmProtocolError("maximum PIN length must be 4..12")
    return _request(
        header,
        "CA",
        _check(tpk, _KEY_REF, "source TPK"),
        _check(zpk, _KEY_REF, "destination ZPK"),
        f"{max_pin_length:02d}",
        _check(pin_block, _HEX16, "PIN block"),
        "01",
        "01",
        _digits(account12, 12, "account number"),
    )


def build_ec(
    header: str, zpk: str, pvk: str, pin_block: str, account12: str, pvki: str, pvv: str
) -> bytes:
    """EC request: verify a format 0 ``pin_block`` under ``zpk`` against ``pvv`` (4N).

    ``pvk`` is the PVK pair's key reference ("U" + 32H); ``pvki`` is one digit.
    """
    return _request(
        header,
        "EC",
        _check(zpk, _KEY_REF, "ZPK"),
        _check(pvk, _KEY_REF, "PVK"),
        _check(pin_block, _HEX16, "PIN block"),
        "01",
        _digits(account12, 12, "account number"),
        _digits(pvki, 1, "PVKI"),
        _digits(pvv, 4, "PVV"),
    )


def _mac_request(header: str, code: str, key_type: str, key: str, data: bytes) -> bytes:
    if key_type not in (KEY_TYPE_TAK, KEY_TYPE_ZAK):
        raise HsmProtocolError("key type must be 003 (TAK) or 008 (ZAK)")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise HsmProtocolError("MAC data must be bytes")
    data = bytes(data)
    if len(data) > _MAX_MESSAGE:
        raise HsmProtocolError("MAC data is longer than 65535 bytes")
    # mode 0 (single block), input format 0 (binary), size 1 (16H), algorithm 3, padding 1
    fields = "00131" + key_type + _check(key, _KEY_REF, "MAC key") + f"{len(data):04X}"
    return _request(header, code, fields) + data


def build_m6(header: str, key_type: str, key: str, data: bytes) -> bytes:
    """M6 request: 16-hex-digit ISO 9797-1 alg. 3 MAC (padding 1) over binary ``data``.

    ``key_type`` is :data:`KEY_TYPE_TAK` or :data:`KEY_TYPE_ZAK`; ``key`` a key reference.
    """
    return _mac_request(header, "M6", key_type, key, data)


def build_m8(header: str, key_type: str, key: str, data: bytes, mac: str) -> bytes:
    """M8 request: verify the 16-hex-digit ``mac`` over binary ``data`` (as :func:`build_m6`)."""
    return _mac_request(header, "M8", key_type, key, data) + _check(mac, _HEX16, "MAC").encode(
        "ascii"
    )


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


def parse_response(data: bytes) -> HsmResponse:
    """Split a response into header, code, error code and fields.

    Raises :class:`HsmProtocolError` when ``data`` is shorter than 8 bytes, the response code is
    not two ASCII letters/digits or the error code is not two decimal digits. The header is
    decoded as Latin-1, so any 4 bytes map one-to-one onto a 4-character string.
    """
    data = bytes(data)
    if len(data) < 8:
        raise HsmProtocolError("HSM response is shorter than 8 bytes")
    code, error = data[4:6], data[6:8]
    if not _CODE.fullmatch(code):
        raise HsmProtocolError("HSM response code is not two letters or digits")
    if not _ERROR.fullmatch(error):
        raise HsmProtocolError("HSM error code is not two digits")
    return HsmResponse(
        header=data[:4].decode("latin-1"),
        code=code.decode("ascii"),
        error=error.decode("ascii"),
        fields=data[8:],
    )


def _expect(resp: HsmResponse, code: str, errors: tuple[str, ...] = ("00",)) -> None:
    if resp.error not in errors:
        raise HsmCommandError(resp.code, resp.error)
    if resp.code != code:
        raise HsmProtocolError(f"expected an {code} response, got {resp.code}")


def _no_fields(resp: HsmResponse) -> None:
    if resp.fields:
        raise HsmProtocolError(f"unexpected fields after {resp.code} {resp.error}")


def nd_result(resp: HsmResponse) -> tuple[str, str]:
    """(LMK check value 16H, firmware version) from an ND response."""
    _expect(resp, "ND")
    match = _ND_FIELDS.fullmatch(resp.fields)
    if match is None:
        raise HsmProtocolError("malformed ND fields")
    return match[1].decode("ascii"), match[2].decode("ascii")


def ca_result(resp: HsmResponse) -> tuple[int, str]:
    """(PIN length, destination PIN block 16H) from a CB response."""
    _expect(resp, "CB")
    match = _CB_FIELDS.fullmatch(resp.fields)
    if match is None:
        raise HsmProtocolError("malformed CB fields")
    return int(match[1]), match[2].decode("ascii")


def ec_verified(resp: HsmResponse) -> bool:
    """True for ED 00 (PIN verified), False for ED 01 (wrong PIN)."""
    _expect(resp, "ED", ("00", "01"))
    _no_fields(resp)
    return resp.error == "00"


def m7_mac(resp: HsmResponse) -> str:
    """The MAC (16H or 8H, upper case) from an M7 response."""
    _expect(resp, "M7")
    if not _MAC_FIELD.fullmatch(resp.fields):
        raise HsmProtocolError("malformed M7 MAC field")
    return resp.fields.decode("ascii")


def m9_verified(resp: HsmResponse) -> bool:
    """True for M9 00 (MAC verified), False for M9 01 (MAC mismatch)."""
    _expect(resp, "M9", ("00", "01"))
    _no_fields(resp)
    return resp.error == "00"
