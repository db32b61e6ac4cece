"""Payment cryptography primitives: DES/3DES, ISO 9564 PIN blocks, retail MAC, Visa PVV, KCV.

Pure functions with no I/O, shared by the HSM mock and the acquirer's terminal simulation.

Conventions and contracts:

* Keys are ``bytes`` of length 8 (single DES), 16 (double-length 3DES, K1 K2 K1) or 24
  (triple-length 3DES). Any other length raises :class:`InvalidKeyError`. Key parity is *not*
  checked here; see :func:`has_odd_parity` for callers that need it.
* Single-DES and double-length keys are expanded to the equivalent 24-byte 3DES key
  (``K K K`` and ``K1 K2 K1``) before they reach ``cryptography``, which has deprecated the
  short forms; the result is bit-for-bit the same cipher, and no warning needs suppressing.
* Hex strings returned by this module are upper case; hex accepted as input may be either case.
* Every error raised deliberately is a :class:`CryptoError` (a ``ValueError``). Error messages
  never contain PINs, PIN blocks or keys.
* Safe to call from several threads at once.
* Key material is cached: the last keys used (at most a few hundred per process, and per
  thread for the ECB and CBC contexts) stay referenced by this module's caches, as cipher objects
  and open ECB contexts, for the life of the process (or the thread). Callers already keep
  these keys in memory; the caches only keep them a little longer, bounded in number.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any, Final, Literal

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, modes

__all__ = [
    "BLOCK_SIZE",
    "CryptoError",
    "InvalidKeyError",
    "PinBlockError",
    "PinBlockErrorReason",
    "decode_pin_block_format0",
    "decode_pin_block_format0_account",
    "decrypt_pin_block",
    "ecb_decrypt",
    "ecb_encrypt",
    "encrypt_pin_block",
    "has_odd_parity",
    "kcv",
    "mac_alg3",
    "pan_field_12",
    "pin_block_format0",
    "pin_block_format0_account",
    "pvv",
    "pvv_from_account",
    "with_odd_parity",
]

BLOCK_SIZE: Final = 8
"""DES block size in bytes."""

_MIN_PIN: Final = 4
_MAX_PIN: Final = 12
_DIGITS: Final = frozenset("0123456789")
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_ZERO_BLOCK: Final = bytes(BLOCK_SIZE)


class CryptoError(ValueError):
    """Base class for every error raised deliberately by this module."""


class InvalidKeyError(CryptoError):
    """A key has an unusable length (or, for callers that check it, bad parity)."""


PinBlockErrorReason = Literal["pin_length", "pin_digits", "control", "filler", "size"]


class PinBlockError(CryptoError):
    """A PIN or a clear PIN block is structurally invalid.

    ``reason`` says which rule was broken, so callers can map it to their own codes:

    * ``"pin_length"``: the PIN (or the block's length nibble) is outside 4..12 digits;
    * ``"pin_digits"``: a PIN digit is not 0-9;
    * ``"control"``: the block's control nibble is not 0 (not an ISO format 0 block);
    * ``"filler"``: a pad nibble after the PIN is not F;
    * ``"size"``: the block is not 8 bytes (or 16 hex digits).
    """

    def __init__(self, message: str, reason: PinBlockErrorReason) -> None:
        super().__init__(message)
        self.reason: PinBlockErrorReason = reason


# --------------------------------------------------------------------------------------------
# DES / 3DES
# --------------------------------------------------------------------------------------------


def _as_3des_key(key: bytes) -> bytes:
    """Expand an 8/16/24-byte key to the equivalent 24-byte 3DES (EDE) key."""
    n = len(key)
    if n == 8:
        return key * 3
    if n == 16:
        return key + key[:8]
    if n == 24:
        return key
    raise InvalidKeyError(f"DES key must be 8, 16 or 24 bytes, got {n}")


@lru_cache(maxsize=512)
def _ecb(key: bytes) -> Cipher[modes.ECB]:
    # Building the algorithm object (key expansion checks) costs more than the block
    # operation itself; the working set is a handful of keys, so cache per key.
    return Cipher(TripleDES(_as_3des_key(key)), modes.ECB())


@lru_cache(maxsize=128)
def _cbc_zero_iv(key: bytes) -> Cipher[modes.CBC]:
    return Cipher(TripleDES(_as_3des_key(key)), modes.CBC(_ZERO_BLOCK))


def _check_blocks(data: bytes) -> None:
    if not data or len(data) % BLOCK_SIZE:
        raise CryptoError(f"data must be a non-empty multiple of 8 bytes, got {len(data)}")


_ECB_CONTEXTS_PER_THREAD: Final = 64
_contexts = threading.local()


def _ecb_pair(key: bytes) -> tuple[CipherContext, CipherContext]:
    """This thread's long-lived ECB (encryptor, decryptor) for ``key``.

    Building a context costs several times the block operation it serves. ECB carries no
    state from one block to the next, so a context whose ``update`` is only ever given whole
    blocks (checked by the callers) returns exactly what a fresh context would, call after
    call. A context is not safe to share between threads, hence one cache per thread; each
    holds at most ``_ECB_CONTEXTS_PER_THREAD`` keys, the oldest dropped first.
    """
    try:
        cache: dict[bytes, tuple[CipherContext, CipherContext]] = _contexts.ecb
    except AttributeError:
        cache = _contexts.ecb = {}
    pair = cache.get(key)
    if pair is None:
        cipher = _ecb(key)  # raises InvalidKeyError before anything is cached
        pair = (cipher.encryptor(), cipher.decryptor())
        if len(cache) >= _ECB_CONTEXTS_PER_THREAD:
            del cache[next(iter(cache))]
        cache[key] = pair
    return pair


def ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """DES/3DES ECB-encrypt ``data`` (a non-empty multiple of 8 bytes) under ``key``.

    Raises :class:`InvalidKeyError` for a bad key length, :class:`CryptoError` for bad data.
    """
    _check_blocks(data)
    return _ecb_pair(bytes(key))[0].update(bytes(data))


def ecb_decrypt(key: bytes, data: bytes) -> bytes:
    """DES/3DES ECB-decrypt ``data`` (a non-empty multiple of 8 bytes) under ``key``."""
    _check_blocks(data)
    return _ecb_pair(bytes(key))[1].update(bytes(data))


def has_odd_parity(key: bytes) -> bool:
    """True when every byte of ``key`` has an odd number of set bits (DES key parity)."""
    return all(b.bit_count() & 1 for b in key)


def with_odd_parity(key: bytes) -> bytes:
    """Return ``key`` with each byte's low bit adjusted so the byte has odd parity."""
    return bytes(b ^ (0 if b.bit_count() & 1 else 1) for b in key)


def kcv(key: bytes, digits: int = 6) -> str:
    """Key check value: encrypt 8 zero bytes under ``key``, keep the first ``digits`` hex digits.

    ``digits`` must be 1..16; 6 is the customary length, 16 gives the whole block.
    """
    if not 1 <= digits <= 2 * BLOCK_SIZE:
        raise CryptoError("KCV length must be 1..16 hex digits")
    return ecb_encrypt(key, _ZERO_BLOCK).hex().upper()[:digits]


# --------------------------------------------------------------------------------------------
# ISO 9564-1 format 0 PIN blocks
# --------------------------------------------------------------------------------------------


def _is_decimal(s: str) -> bool:
    # str.isdigit() alone accepts non-ASCII digits such as "²"; payment fields are ASCII only,
    # and among ASCII characters isdigit() is exactly 0-9.
    return s.isascii() and s.isdigit()


def pan_field_12(pan: str) -> str:
    """The 12 rightmost PAN digits excluding the check digit (the format 0 account field).

    ``pan`` is 2..19 decimal digits, its last digit being the check digit (not verified here).
    Per ISO 9564-1, a PAN with fewer than 12 digits before the check digit is left-padded with
    zeros. Raises :class:`CryptoError` for anything that is not such a PAN.
    """
    if not _is_decimal(pan) or not 2 <= len(pan) <= 19:
        raise CryptoError("PAN must be 2..19 decimal digits")
    return pan[:-1][-12:].rjust(12, "0")


def _check_account12(account12: str) -> None:
    if len(account12) != 12 or not _is_decimal(account12):
        raise CryptoError("account number field must be exactly 12 decimal digits")


def _check_pin(pin: str) -> None:
    if not _MIN_PIN <= len(pin) <= _MAX_PIN:
        raise PinBlockError("PIN must be 4..12 digits", "pin_length")
    if not _is_decimal(pin):
        raise PinBlockError("PIN must contain decimal digits only", "pin_digits")


def pin_block_format0_account(pin: str, account12: str) -> bytes:
    """Clear ISO 9564-1 format 0 PIN block from a PIN and the 12-digit account number field.

    PIN field ``0 N P..P F..F`` (16 nibbles) XOR account field ``0000 A1..A12``. Raises
    :class:`PinBlockError` for a PIN that is not 4..12 decimal digits and :class:`CryptoError`
    for a bad account field.
    """
    _check_pin(pin)
    _check_account12(account12)
    # The account field is 0000 followed by the 12 digits read as hex nibbles: as an integer,
    # the digits read in base 16.
    pin_field = int(f"0{len(pin):X}{pin}".ljust(16, "F"), 16)
    return (pin_field ^ int(account12, 16)).to_bytes(BLOCK_SIZE, "big")


def pin_block_format0(pin: str, pan: str) -> bytes:
    """Clear ISO 9564-1 format 0 PIN block (8 bytes) for ``pin`` and the full ``pan``."""
    return pin_block_format0_account(pin, pan_field_12(pan))


def decode_pin_block_format0_account(block: bytes, account12: str) -> str:
    """Recover the PIN from a clear format 0 block and the 12-digit account number field.

    Raises :class:`PinBlockError` (see its ``reason``) when the block is not 8 bytes, its
    control nibble is not 0, its length nibble is outside 4..12, a PIN nibble is not 0-9 or a
    pad nibble is not F; :class:`CryptoError` for a bad account field.
    """
    if len(block) != BLOCK_SIZE:
        raise PinBlockError("PIN block must be 8 bytes", "size")
    _check_account12(account12)
    nibbles = f"{int.from_bytes(block, 'big') ^ int(account12, 16):016X}"
    if nibbles[0] != "0":
        raise PinBlockError("PIN block control field is not format 0", "control")
    length = int(nibbles[1], 16)
    if not _MIN_PIN <= length <= _MAX_PIN:
        raise PinBlockError("PIN block length nibble is outside 4..12", "pin_length")
    pin, filler = nibbles[2 : 2 + length], nibbles[2 + length :]
    if not _is_decimal(pin):
        raise PinBlockError("PIN block holds a non-decimal PIN digit", "pin_digits")
    if filler.strip("F"):
        raise PinBlockError("PIN block filler is not all F", "filler")
    return pin


def decode_pin_block_format0(block: bytes, pan: str) -> str:
    """Recover the PIN from a clear format 0 block and the full ``pan`` (see the account form)."""
    return decode_pin_block_format0_account(block, pan_field_12(pan))


def encrypt_pin_block(pin: str, pan: str, key: bytes) -> str:
    """Build a format 0 PIN block for ``pin``/``pan`` and encrypt it under ``key``.

    Returns 16 upper-case hex digits (the form carried in ISO 8583 field 52 and HSM commands).
    """
    return ecb_encrypt(key, pin_block_format0(pin, pan)).hex().upper()


def decrypt_pin_block(block_hex: str, pan: str, key: bytes) -> str:
    """Decrypt a 16-hex-digit format 0 PIN block under ``key`` and return the PIN.

    Raises :class:`PinBlockError` (reason ``"size"``) when ``block_hex`` is not 16 hex digits,
    or as :func:`decode_pin_block_format0` does when the decrypted block is invalid.
    """
    if len(block_hex) != 16 or not all(c in _HEX_DIGITS for c in block_hex):
        raise PinBlockError("encrypted PIN block must be 16 hex digits", "size")
    return decode_pin_block_format0(ecb_decrypt(key, bytes.fromhex(block_hex)), pan)


# --------------------------------------------------------------------------------------------
# ISO 9797-1 MAC algorithm 3 (ANSI X9.19 retail MAC)
# --------------------------------------------------------------------------------------------


def _pad(data: bytes, padding: int) -> bytes:
    if padding == 1:
        # Method 1 pads with zeros only when needed, but an empty message still gets one block.
        if not data:
            return _ZERO_BLOCK
        return data + bytes(-len(data) % BLOCK_SIZE)
    if padding == 2:
        data = data + b"\x80"
        return data + bytes(-len(data) % BLOCK_SIZE)
    raise CryptoError("MAC padding method must be 1 or 2")


def mac_alg3(key16: bytes, data: bytes, padding: int = 1) -> bytes:
    """ISO 9797-1 MAC algorithm 3 (ANSI X9.19 retail MAC) over ``data``; returns 8 bytes.

    ``key16`` = K1 || K2. The padded data is DES-CBC encrypted under K1 with a zero IV; the last
    output block is then decrypted under K2 and encrypted again under K1. ``padding`` is the
    ISO 9797-1 padding method: 1 (zero bytes up to a multiple of 8; empty data becomes one zero
    block) or 2 (0x80, then zero bytes). Truncation (e.g. to 4 bytes) is left to the caller.
    """
    key16 = bytes(key16)
    if len(key16) != 16:
        raise InvalidKeyError(f"retail MAC key must be 16 bytes, got {len(key16)}")
    k1, k2 = key16[:8], key16[8:]
    last = _cbc_last_block(k1, _pad(bytes(data), padding))
    return ecb_encrypt(k1, ecb_decrypt(k2, last))


def _cbc_last_block(key: bytes, padded: bytes) -> bytes:
    """The last block of the zero-IV CBC encryption of ``padded`` (whole blocks) under ``key``.

    This thread's long-lived CBC context for ``key`` is reused: its chaining value is the last
    block it produced, ``c``; XORing ``c`` into the first block cancels it, so the context
    computes E(p1 xor c xor c) = E(p1 xor zero IV), exactly what a fresh zero-IV context
    would, and chains the following blocks as usual.
    """
    try:
        cache: dict[bytes, list[Any]] = _contexts.cbc
    except AttributeError:
        cache = _contexts.cbc = {}
    entry = cache.pop(key, None)  # out of the cache while in use: dropped if update fails
    if entry is None:
        entry = [_cbc_zero_iv(key).encryptor(), 0]
    context, chaining = entry
    first = int.from_bytes(padded[:BLOCK_SIZE], "big") ^ chaining
    out = context.update(first.to_bytes(BLOCK_SIZE, "big") + padded[BLOCK_SIZE:])
    last = out[-BLOCK_SIZE:]
    entry[1] = int.from_bytes(last, "big")
    if len(cache) >= _ECB_CONTEXTS_PER_THREAD:
        del cache[next(iter(cache))]
    cache[key] = entry
    return last


# --------------------------------------------------------------------------------------------
# Visa PIN verification value
# --------------------------------------------------------------------------------------------


def _decimalise(hex_text: str, digits: int = 4) -> str:
    # First pass: decimal digits in order; second pass (only if short): A-F mapped to 0-5.
    out = [c for c in hex_text if c in _DIGITS]
    if len(out) < digits:
        out += [str(int(c, 16) - 10) for c in hex_text if c not in _DIGITS]
    return "".join(out[:digits])


def pvv_from_account(pvk: bytes, account12: str, pvki: str, pin: str) -> str:
    """Visa PVV from the 12-digit account number field (see :func:`pvv`).

    The 11 rightmost digits of the 12 rightmost PAN digits excluding the check digit are the 11
    rightmost PAN digits excluding the check digit, so this equals the PAN-based definition.
    """
    pvk = bytes(pvk)
    if len(pvk) != 16:
        raise InvalidKeyError(f"PVK pair must be 16 bytes, got {len(pvk)}")
    _check_account12(account12)
    if len(pvki) != 1 or not _is_decimal(pvki):
        raise CryptoError("PVKI must be one decimal digit")
    _check_pin(pin)
    tsp = account12[1:] + pvki + pin[:4]
    return _decimalise(ecb_encrypt(pvk, bytes.fromhex(tsp)).hex().upper())


def pvv(pvk: bytes, pan: str, pvki: str, pin: str) -> str:
    """Visa PIN verification value (4 decimal digits).

    Transformed security parameter (TSP) = 11 rightmost PAN digits excluding the check digit +
    PVKI (1 digit) + 4 leftmost PIN digits; it is read as 8 bytes of packed hex and 3DES
    encrypted under the 16-byte PVK pair. The result's hex digits are scanned left to right for
    0-9; if fewer than 4 are found, a second scan takes A-F as 0-5.
    """
    return pvv_from_account(pvk, pan_field_12(pan), pvki, pin)
