"""Sans-IO host command processor of the HSM mock, after the Thales payShield command set.

:func:`process` turns one request message into one response message; it does no I/O, keeps no
state between calls and never raises. The TCP shell strips and adds the length header
(``PAYLAB_FRAMING``, 2-byte binary by default).

Message layout (ASCII unless stated otherwise, fields concatenated without separators)::

    request:  header (4 bytes, any value) | command code (2) | command fields
    response: header (echoed unchanged)   | response code (2) | error code (2N) | response fields

The response code is the command code with its second character advanced by one (NC->ND,
CA->CB, EC->ED, M6->M7, M8->M9; "9" wraps to "0", "Z" to "A", "z" to "a"). If either code
character is not an ASCII letter or digit the response code is "ZZ". Requests shorter than 6
bytes get the header (space-padded to 4 bytes) + "ZZ" + "15". Response fields are only present
with error code 00 (the NC, CA and M6 fields listed below); every other response stops after the
error code.

Commands (``U+32H`` = key reference: "U" + 32 hex digits, a double-length key under the LMK;
``nN``/``nH`` = n decimal/hex digits; hex input is accepted in either case, output is upper case):

* ``NC`` diagnostics / link heartbeat. No fields. Response ``ND`` 00 + LMK check value (16H:
  the LMK's full 8-byte encryption of zeros) + firmware version ``0007-E000``.
* ``CA`` translate a PIN block from a TPK to a ZPK. Fields: source TPK (U+32H), destination
  ZPK (U+32H), maximum PIN length (2N, 04..12), source PIN block (16H), source format (2N, only
  01 = ISO 9564-1 format 0), destination format (2N, only 01), account number (12N: the 12
  rightmost PAN digits excluding the check digit). Response ``CB`` 00 + PIN length (2N) +
  destination PIN block (16H) + destination format (01).
* ``EC`` verify an interchange PIN with the Visa/ABA PVV method. Fields: ZPK (U+32H), PVK pair
  (U+32H), PIN block (16H), format (2N, only 01), account number (12N), PVKI (1N), PVV (4N).
  Response ``ED`` 00 when the PIN matches, 01 when it does not. The PVV's transformed security
  parameter uses the 11 rightmost digits of the 12-digit account number field: those are the
  11 rightmost PAN digits excluding the check digit, so this equals the PAN-based definition.
* ``M6`` generate a MAC. Fields: mode flag (1N, only 0 = single block message), input format
  flag (1N: 0 binary, 1 hex-encoded text that is decoded before MACing), MAC size (1N: 1 = 16H,
  0 = 8H), MAC algorithm (1N, only 3 = ISO 9797-1 algorithm 3 / ANSI X9.19), padding method
  (1N: 1 or 2, ISO 9797-1), key type (3H: 003 TAK or 008 ZAK), key (U+32H), message length
  (4H: byte count of the message field as transmitted, i.e. of the hex text in hex mode),
  message. Response ``M7`` 00 + MAC (16H or 8H, the leftmost digits of the MAC).
* ``M8`` verify a MAC: the M6 fields, then the MAC (16H or 8H per the size flag). Response
  ``M9`` 00 when the MAC matches, 01 when it does not.

Error codes:

* ``00`` no error.
* ``01`` verification failure (EC: wrong PIN; M8: MAC mismatch).
* ``04`` invalid key type code (M6/M8 key type is hex but not 003 or 008).
* ``10`` key error: a key reference is not "U" + 32 hex digits, or it decrypts under the LMK to
  a key without odd parity (not encrypted under this LMK, or corrupted).
* ``15`` invalid input data: message too short or too long (trailing bytes), a field that is not
  numeric/hex as required, an unsupported flag value (mode, input format, MAC size, algorithm,
  padding), a maximum PIN length outside 04..12, an odd-length or non-hex hex-mode message.
* ``20`` the PIN block does not contain valid values (control nibble not 0, non-decimal PIN
  digit, filler not F) once decrypted.
* ``23`` invalid PIN block format code (anything but 01).
* ``24`` the PIN is fewer than 4 or more than 12 digits, or longer than the maximum PIN length.
* ``41`` internal error: an unexpected exception in the processor (a bug; never expected).
* ``68`` command unknown or disabled.

Validation runs in two passes: the whole field layout is parsed first (any structural problem is
15), then values are checked in field order, so the first bad value decides the error code.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from hsm.errors import KeyReferenceError
from hsm.keyfile import KeyFile, decrypt_under_lmk
from shared.crypto import (
    PinBlockError,
    decode_pin_block_format0_account,
    ecb_decrypt,
    ecb_encrypt,
    kcv,
    mac_alg3,
    pin_block_format0_account,
    pvv_from_account,
)

__all__ = [
    "ERR_FORMAT",
    "ERR_INPUT",
    "ERR_INTERNAL",
    "ERR_KEY",
    "ERR_KEY_TYPE",
    "ERR_OK",
    "ERR_PIN_BLOCK",
    "ERR_PIN_LENGTH",
    "ERR_UNKNOWN",
    "ERR_VERIFY",
    "FIRMWARE_VERSION",
    "KNOWN_COMMANDS",
    "UNKNOWN_COMMAND",
    "CommandResult",
    "process",
    "process_with_result",
    "response_code",
]

ERR_OK: Final = "00"
ERR_VERIFY: Final = "01"
ERR_KEY_TYPE: Final = "04"
ERR_KEY: Final = "10"
ERR_INPUT: Final = "15"
ERR_PIN_BLOCK: Final = "20"
ERR_FORMAT: Final = "23"
ERR_PIN_LENGTH: Final = "24"
ERR_INTERNAL: Final = "41"
ERR_UNKNOWN: Final = "68"

FIRMWARE_VERSION: Final = "0007-E000"
"""Firmware string reported by NC."""

UNKNOWN_COMMAND: Final = "??"
"""``CommandResult.command`` for short input and unknown codes (keeps metric labels bounded)."""

_HEADER_LEN: Final = 4
_MIN_REQUEST: Final = _HEADER_LEN + 2
_KEY_REF_LEN: Final = 33
_FORMAT_ISO0: Final = "01"
_MAX_PIN_DEFAULT: Final = 12
_MAC_KEY_TYPES: Final = frozenset({"003", "008"})
_DIGIT_BYTES: Final = frozenset(b"0123456789")
_HEX_BYTES: Final = frozenset(b"0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Outcome of one request, for the shell's metrics and logs.

    ``command`` is the 2-letter code when it is one of :data:`KNOWN_COMMANDS`, otherwise
    :data:`UNKNOWN_COMMAND`; ``error`` is the 2-digit error code sent; ``response`` the full
    response message (without length prefix).
    """

    command: str
    error: str
    response: bytes


class _Reject(Exception):
    """Abort a command with an error code; internal to this module."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class _Cursor:
    """Reads fixed-length fields off a request body; structural problems raise ``_Reject(15)``."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        """The next ``n`` raw bytes."""
        end = self._pos + n
        if end > len(self._data):
            raise _Reject(ERR_INPUT)
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def numeric(self, n: int) -> str:
        """The next ``n`` bytes, which must be ASCII decimal digits."""
        chunk = self.take(n)
        if not _DIGIT_BYTES.issuperset(chunk):
            raise _Reject(ERR_INPUT)
        return chunk.decode("ascii")

    def hexa(self, n: int) -> str:
        """The next ``n`` bytes, which must be ASCII hex digits; returned upper case."""
        chunk = self.take(n)
        if not _HEX_BYTES.issuperset(chunk):
            raise _Reject(ERR_INPUT)
        return chunk.decode("ascii").upper()

    def choice(self, n: int, allowed: frozenset[str]) -> str:
        """The next ``n`` decimal digits, which must be one of ``allowed`` (else 15)."""
        value = self.numeric(n)
        if value not in allowed:
            raise _Reject(ERR_INPUT)
        return value

    def key_ref(self) -> str:
        """A 33-byte key reference, unvalidated: its content is a key error (10), not 15."""
        return self.take(_KEY_REF_LEN).decode("latin-1")

    def end(self) -> None:
        """Reject trailing bytes."""
        if self._pos != len(self._data):
            raise _Reject(ERR_INPUT)


# --------------------------------------------------------------------------------------------
# Value checks shared by the commands
# --------------------------------------------------------------------------------------------


def _key(keys: KeyFile, ref: str) -> bytes:
    try:
        return _clear_key(keys.lmk, ref)
    except KeyReferenceError:
        raise _Reject(ERR_KEY) from None


@lru_cache(maxsize=256)
def _clear_key(lmk: bytes, ref: str) -> bytes:
    # A real HSM keeps its working keys decrypted in secure memory too; here the same few
    # keys come with every command, and decrypting them again cost more than the command's
    # own cryptography. A rejected reference raises and is therefore never cached.
    return decrypt_under_lmk(lmk, ref)


def _check_format(code: str) -> None:
    if code != _FORMAT_ISO0:
        raise _Reject(ERR_FORMAT)


def _pin_from_block(key: bytes, block_hex: str, account12: str, max_len: int) -> str:
    clear = ecb_decrypt(key, bytes.fromhex(block_hex))
    try:
        pin = decode_pin_block_format0_account(clear, account12)
    except PinBlockError as exc:
        raise _Reject(ERR_PIN_LENGTH if exc.reason == "pin_length" else ERR_PIN_BLOCK) from None
    if len(pin) > max_len:
        raise _Reject(ERR_PIN_LENGTH)
    return pin


# --------------------------------------------------------------------------------------------
# Commands: each returns the response fields that follow error code 00, or raises _Reject.
# --------------------------------------------------------------------------------------------


def _nc(cur: _Cursor, keys: KeyFile) -> bytes:
    cur.end()
    return (kcv(keys.lmk, 16) + FIRMWARE_VERSION).encode("ascii")


def _ca(cur: _Cursor, keys: KeyFile) -> bytes:
    tpk_ref = cur.key_ref()  # source TPK                 U+32H
    zpk_ref = cur.key_ref()  # destination ZPK            U+32H
    max_len = cur.numeric(2)  # maximum PIN length        2N
    block = cur.hexa(16)  # source PIN block              16H
    src_format = cur.numeric(2)  # source format          2N
    dst_format = cur.numeric(2)  # destination format     2N
    account = cur.numeric(12)  # account number           12N
    cur.end()

    tpk = _key(keys, tpk_ref)
    zpk = _key(keys, zpk_ref)
    if not 4 <= int(max_len) <= _MAX_PIN_DEFAULT:
        raise _Reject(ERR_INPUT)
    _check_format(src_format)
    _check_format(dst_format)
    pin = _pin_from_block(tpk, block, account, int(max_len))
    out = ecb_encrypt(zpk, pin_block_format0_account(pin, account)).hex().upper()
    return f"{len(pin):02d}{out}{dst_format}".encode("ascii")


def _ec(cur: _Cursor, keys: KeyFile) -> bytes:
    zpk_ref = cur.key_ref()  # ZPK                        U+32H
    pvk_ref = cur.key_ref()  # PVK pair                   U+32H
    block = cur.hexa(16)  # PIN block                     16H
    pin_format = cur.numeric(2)  # PIN block format       2N
    account = cur.numeric(12)  # account number           12N
    pvki = cur.numeric(1)  # PVK index                    1N
    expected = cur.numeric(4)  # PVV on file              4N
    cur.end()

    zpk = _key(keys, zpk_ref)
    pvk = _key(keys, pvk_ref)
    _check_format(pin_format)
    pin = _pin_from_block(zpk, block, account, _MAX_PIN_DEFAULT)
    actual = pvv_from_account(pvk, account, pvki, pin)
    if not hmac.compare_digest(actual.encode("ascii"), expected.encode("ascii")):
        raise _Reject(ERR_VERIFY)
    return b""


@dataclass(frozen=True, slots=True)
class _MacRequest:
    mac_hex_len: int
    padding: int
    key: bytes
    message: bytes


def _mac_fields(cur: _Cursor, keys: KeyFile, *, with_mac: bool) -> tuple[_MacRequest, str]:
    """Parse the M6 layout (plus the trailing MAC for M8) and check its values."""
    cur.choice(1, frozenset({"0"}))  # mode flag: single block only      1N
    input_format = cur.choice(1, frozenset({"0", "1"}))  # binary / hex  1N
    size = cur.choice(1, frozenset({"0", "1"}))  # 8H / 16H MAC          1N
    cur.choice(1, frozenset({"3"}))  # MAC algorithm 3                   1N
    padding = cur.choice(1, frozenset({"1", "2"}))  # padding method     1N
    key_type = cur.hexa(3)  # key type                                   3H
    key_ref = cur.key_ref()  # TAK / ZAK                                 U+32H
    length = int(cur.hexa(4), 16)  # message field length in bytes      4H
    message = cur.take(length)  # message                               length bytes
    mac_hex_len = 16 if size == "1" else 8
    mac = cur.hexa(mac_hex_len) if with_mac else ""  # MAC (M8 only)     16H / 8H
    cur.end()

    if key_type not in _MAC_KEY_TYPES:
        raise _Reject(ERR_KEY_TYPE)
    key = _key(keys, key_ref)
    if input_format == "1":
        if len(message) % 2 or not _HEX_BYTES.issuperset(message):
            raise _Reject(ERR_INPUT)
        message = bytes.fromhex(message.decode("ascii"))
    return _MacRequest(mac_hex_len, int(padding), key, message), mac


def _mac_hex(req: _MacRequest) -> str:
    return mac_alg3(req.key, req.message, req.padding).hex().upper()[: req.mac_hex_len]


def _m6(cur: _Cursor, keys: KeyFile) -> bytes:
    req, _ = _mac_fields(cur, keys, with_mac=False)
    return _mac_hex(req).encode("ascii")


def _m8(cur: _Cursor, keys: KeyFile) -> bytes:
    req, mac = _mac_fields(cur, keys, with_mac=True)
    if not hmac.compare_digest(_mac_hex(req).encode("ascii"), mac.encode("ascii")):
        raise _Reject(ERR_VERIFY)
    return b""


_Handler = Callable[[_Cursor, KeyFile], bytes]

_HANDLERS: Final[dict[bytes, _Handler]] = {
    b"NC": _nc,
    b"CA": _ca,
    b"EC": _ec,
    b"M6": _m6,
    b"M8": _m8,
}

KNOWN_COMMANDS: Final = frozenset(code.decode("ascii") for code in _HANDLERS)
"""Command codes this processor implements."""


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _is_alnum(c: int) -> bool:
    return 0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A


def _advance(c: int) -> int:
    if c in (0x39, 0x5A, 0x7A):  # "9", "Z", "z" wrap within their class
        return c - (9 if c == 0x39 else 25)
    return c + 1


def response_code(command: bytes) -> bytes:
    """The response code for a 2-byte command code (see the module docstring)."""
    if len(command) != 2 or not (_is_alnum(command[0]) and _is_alnum(command[1])):
        return b"ZZ"
    return bytes((command[0], _advance(command[1])))


def process_with_result(request: bytes | bytearray | memoryview, keys: KeyFile) -> CommandResult:
    """Process one request (no length prefix) and report the command and error code too.

    Never raises: every failure, including an unexpected internal one (error 41), becomes an
    error response. The response always starts with a 4-byte header.
    """
    # Copy buffers from the shell; anything that is not a buffer is treated as empty input.
    data = bytes(request) if isinstance(request, bytes | bytearray | memoryview) else b""
    header = data[:_HEADER_LEN].ljust(_HEADER_LEN, b" ")
    if len(data) < _MIN_REQUEST:
        return CommandResult(UNKNOWN_COMMAND, ERR_INPUT, header + b"ZZ" + ERR_INPUT.encode())
    code = data[_HEADER_LEN:_MIN_REQUEST]
    reply_code = response_code(code)
    handler = _HANDLERS.get(code)
    if handler is None:
        return CommandResult(UNKNOWN_COMMAND, ERR_UNKNOWN, header + reply_code + b"68")
    command = code.decode("ascii")
    try:
        fields = handler(_Cursor(data[_MIN_REQUEST:]), keys)
        error = ERR_OK
    except _Reject as rejected:
        error, fields = rejected.error, b""
    except Exception:
        # A bug, not a client error; the message is deliberately not echoed anywhere because
        # a traceback here could carry PIN blocks or key references.
        error, fields = ERR_INTERNAL, b""
    return CommandResult(command, error, header + reply_code + error.encode("ascii") + fields)


def process(request: bytes | bytearray | memoryview, keys: KeyFile) -> bytes:
    """Process one request message (without length prefix) and return the response message.

    Never raises, whatever the input; see the module docstring for layouts and error codes.
    """
    return process_with_result(request, keys).response
