"""ISO-8583 encode/decode over :data:`shared.iso.spec.SPEC`, plus MAC placement.

pyiso8583 is the codec of record. Because paylab's spec is all ASCII (every data element,
length prefix, MTI and hex bitmap), ``encode`` and ``decode`` first try a specialised fast
path built from SPEC at import time (:func:`_fast_encode`, :func:`_fast_decode`). The fast
path handles only the ordinary well-formed case and returns ``None`` for anything else, so
pyiso8583 decides every unusual input and produces the canonical result or error. A
differential test (``tests/test_codec_fast.py``) holds the fast path byte-for-byte equal to
pyiso8583. If SPEC ever gains a header or a non-ASCII element, the fast path disables itself
and the library alone is used.

``encode`` never mutates the caller's dict (pyiso8583 adds bitmap keys to the dict it is
given). ``decode`` turns every malformed input into :class:`~shared.errors.DecodeError` so
callers handle one type: the library's own errors, and a message announcing field 65 (which
pyiso8583 reads as a tertiary bitmap naming fields 129-192, elements SPEC does not have).

MAC rule: the MAC is the last data element of a message: field 64 when the message has
no secondary bitmap, field 128 when it has one. The MAC is computed over the encoded
message up to (not including) the 16 MAC characters, with the MAC's bitmap bit set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import iso8583
from iso8583.decoder import DecodeError as _LibDecodeError
from iso8583.encoder import EncodeError as _LibEncodeError

from shared.errors import DecodeError, ValidationError
from shared.iso.messages import Message
from shared.iso.spec import SPEC
from shared.pan import mask_pan

MAC_LEN = 16
_MAC_PLACEHOLDER = "0" * MAC_LEN


# ---------------------------------------------------------------------------------------------
# Fast path
# ---------------------------------------------------------------------------------------------

FieldTable = dict[int, tuple[int, int]]

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_HEX_BYTES = frozenset(b"0123456789abcdefABCDEF")


def _build_table(spec: Mapping[str, Mapping[str, Any]]) -> FieldTable | None:
    """``field number -> (len_type, max_len)`` for fields 2..128 (65 excluded), or ``None``.

    ``None`` (fast path disabled) unless the spec is of the shape the fast path assumes: no
    header, an ASCII MTI and ASCII hex bitmaps, and every data element ASCII with an ASCII
    decimal length prefix counted in bytes. ``max_len`` of a variable field is capped at what
    its prefix can express, which is where pyiso8583 stops too. A field absent from the spec
    is absent from the table (pyiso8583 decides messages that carry it).
    """
    try:
        if spec["h"]["max_len"] > 0:
            return None
        for key in ("t", "p", "1"):
            if spec[key]["data_enc"] != "ascii":
                return None
        table: FieldTable = {}
        for number in range(2, 129):
            if number == 65:
                continue
            field = spec.get(str(number))
            if field is None:
                continue
            len_type = field["len_type"]
            max_len = field["max_len"]
            if (
                field["data_enc"] != "ascii"
                or field["len_enc"] != "ascii"
                or field.get("len_count", "bytes") != "bytes"
                or type(len_type) is not int
                or type(max_len) is not int
                or not 0 <= len_type <= 3
                or max_len < 0
            ):
                return None
            if len_type:
                max_len = min(max_len, 10**len_type - 1)
            table[number] = (len_type, max_len)
    except (KeyError, TypeError):
        return None
    return table


_TABLE: FieldTable | None = _build_table(SPEC)
# Encode side: canonical key -> (bit in a 128-bit bitmap, len_type, max_len).
_KEYS: dict[str, tuple[int, int, int]] = {
    str(n): (1 << (128 - n), lt, ml) for n, (lt, ml) in (_TABLE or {}).items()
}
# Decode side: bit_length of a 128-bit bitmap -> (that bit, canonical key, len_type,
# max_len), None where the table has no field (fields in the order bits are cleared).
_BY_TOP: tuple[tuple[int, str, int, int] | None, ...] = tuple(
    (1 << (top - 1), str(129 - top), *_TABLE[129 - top])
    if _TABLE is not None and 129 - top in _TABLE
    else None
    for top in range(129)
)
# Zero-padded length prefixes, indexed by [len_type][length].
_PREFIXES: tuple[tuple[str, ...], ...] = tuple(
    tuple(f"{n:0{lt}d}" for n in range(10**lt)) if lt else ("",) for lt in range(4)
)
_BIT1 = 1 << 127
_LOW64 = (1 << 64) - 1


def _fast_encode(msg: Mapping[Any, Any]) -> bytes | None:
    """The bytes pyiso8583 would produce for ``msg``, or ``None`` if ``msg`` is not ordinary.

    Ordinary: the MTI ``"t"`` is a ``str`` of 4 ASCII characters; every other key is ``"p"``
    or ``"1"`` (ignored, as the bitmaps are computed) or a canonical field key ``str(n)``
    for n in 2..128 except 65, with a value of type exactly ``str``, all ASCII, of exactly
    ``max_len`` characters for a fixed field and at most ``max_len`` for a variable one.
    """
    if _TABLE is None:
        return None
    mti = msg.get("t")
    if type(mti) is not str or len(mti) != 4 or not mti.isascii():
        return None
    keys = _KEYS
    bits = 0
    parts: list[tuple[int, str]] = []
    for key, value in msg.items():
        entry = keys.get(key) if type(key) is str else None
        if entry is None:
            if key == "t" or key == "p" or key == "1":
                continue
            return None
        if type(value) is not str or not value.isascii():
            return None
        bit, len_type, max_len = entry
        size = len(value)
        if len_type:
            if size > max_len:
                return None
            value = _PREFIXES[len_type][size] + value
        elif size != max_len:
            return None
        bits |= bit
        parts.append((bit, value))
    # Highest bit first is ascending field number, the wire order.
    parts.sort(reverse=True)
    # Bit 1 announces the secondary bitmap, needed when any field above 64 is present.
    head = f"{mti}{bits | _BIT1:032X}" if bits & _LOW64 else f"{mti}{bits >> 64:016X}"
    return (head + "".join(value for _, value in parts)).encode("ascii")


def _fast_decode(data: Any) -> dict[str, str] | None:
    """What :func:`decode` returns for ``data`` (before its MTI check), or ``None``.

    Handles only the ordinary well-formed message: all ASCII, 4-character MTI, 16 hex
    characters per bitmap, no tertiary bitmap (bit 65), length prefixes of ASCII digits
    within ``max_len``, no truncation and nothing after the last field. Anything else gives
    ``None`` so pyiso8583 produces the canonical result or error; the fast path never
    returns a result different from the library's.
    """
    if _TABLE is None:  # the fast path is off (see _build_table)
        return None
    kind = type(data)
    if kind is not bytes and kind is not bytearray:
        return None
    size = len(data)
    if size < 20 or not data.isascii():
        return None
    text = data.decode("ascii")
    primary = text[4:20]
    if not _HEX_DIGITS.issuperset(primary):
        return None
    bits = int(primary, 16) << 64
    pos = 20
    if bits & _BIT1:
        secondary = text[20:36]
        if len(secondary) != 16 or not _HEX_DIGITS.issuperset(secondary):
            return None
        low = int(secondary, 16)
        if low >> 63:
            return None  # bit 65: pyiso8583 reads a tertiary bitmap
        bits = (bits ^ _BIT1) | low
        pos = 36
    doc: dict[str, str] = {"t": text[:4]}
    by_top = _BY_TOP
    while bits:
        entry = by_top[bits.bit_length()]
        if entry is None:
            return None
        bit, key, len_type, length = entry
        bits ^= bit
        if len_type:
            end = pos + len_type
            prefix = text[pos:end]
            # str.isdigit is ASCII-only here (text is ASCII); int() alone would take "+5".
            if end > size or not prefix.isdigit():
                return None
            declared = int(prefix)
            if declared > length:
                return None
            length = declared
            pos = end
        end = pos + length
        if end > size:
            return None
        doc[key] = text[pos:end]
        pos = end
    if pos != size:
        return None
    return doc


# ---------------------------------------------------------------------------------------------
# Public codec
# ---------------------------------------------------------------------------------------------


def encode(msg: Mapping[str, str]) -> bytes:
    """Encode a message dict. Raises :class:`ValidationError` when a field does not fit."""
    fast = _fast_encode(msg)
    if fast is not None:
        return fast
    doc = {k: v for k, v in msg.items() if k not in ("p", "1")}
    try:
        raw, _ = iso8583.encode(doc, SPEC)
    except _LibEncodeError as exc:
        raise ValidationError(f"cannot encode: {exc}", field=getattr(exc, "field", None)) from None
    return bytes(raw)


def encode_keeping(msg: Mapping[str, str]) -> tuple[bytes, Message | None]:
    """``encode(msg)``, with what :func:`decode` returns for those bytes when that follows
    from ``msg`` alone (``None`` otherwise): a sender that records what it sent need not
    decode its own payload again.

    Known for a message the fast encoder takes (its keys are the MTI, the ignored bitmap
    keys and canonical field keys, its values ASCII strings that fit their fields, so
    decoding gives every value back verbatim) whose MTI is 4 digits: the MTI first, then
    the fields in ascending order, the bitmap keys left out, as :func:`decode` builds it.
    """
    fast = _fast_encode(msg)
    if fast is None:
        return encode(msg), None
    mti = msg["t"]
    if not mti.isdigit():
        return fast, None  # decode refuses it: let the caller find that out
    doc: dict[str, str] = {"t": mti}
    for key in sorted((k for k in msg if k != "t" and k != "p" and k != "1"), key=int):
        doc[key] = msg[key]
    return fast, doc


def decode(data: bytes) -> Message:
    """Decode one payload into a message dict (bitmap keys removed).

    Raises :class:`DecodeError`, and only that, for every malformed input: anything
    pyiso8583 rejects (bad MTI, bad bitmap, truncated or extra data), non-ASCII bytes, and
    a secondary bitmap with bit 65 set (a tertiary bitmap, which paylab does not use).
    """
    doc = _fast_decode(data)
    if doc is None:
        if _announces_field_65(data):
            raise DecodeError("bit 65 is set: tertiary bitmaps (fields 129-192) are not used")
        try:
            doc, _ = iso8583.decode(data, SPEC)
        except _LibDecodeError as exc:
            raise DecodeError(str(exc)) from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"undecodable bytes: {type(exc).__name__}") from None
        except (KeyError, IndexError, TypeError) as exc:
            # An element the spec does not describe: never let the library's lookup escape.
            raise DecodeError(f"undecodable message: {type(exc).__name__}") from None
        doc.pop("p", None)
        doc.pop("1", None)
    mti = doc.get("t", "")
    if not (mti.isascii() and mti.isdigit()):
        raise DecodeError(f"MTI {mti!r} is not 4 digits")
    return doc


def _announces_field_65(data: Any) -> bool:
    """True when ``data`` has ASCII hex primary and secondary bitmaps (bit 1 set) whose
    secondary bitmap sets bit 65: pyiso8583 would read a tertiary bitmap there."""
    head = data[4:36] if isinstance(data, bytes | bytearray) else b""
    if len(head) != 32 or not _HEX_BYTES.issuperset(head):
        return False
    return bool(int(head[0:1], 16) & 8) and bool(int(head[16:17], 16) & 8)


def mac_field(msg: Mapping[str, str]) -> str:
    """Which field carries the MAC for ``msg``: "128" if any field above 64 is present."""
    for k in msg:
        if k.isdigit() and int(k) > 64 and k != "128":
            return "128"
    return "64"


def encode_for_mac(msg: Mapping[str, str]) -> tuple[str, bytes]:
    """Return (mac field, the bytes the MAC covers) for a message about to be MACed."""
    field = mac_field(msg)
    doc = {k: v for k, v in msg.items() if k not in ("64", "128")}
    doc[field] = _MAC_PLACEHOLDER
    return field, encode(doc)[:-MAC_LEN]


def mac_input_of_received(raw: bytes, msg: Mapping[str, str]) -> tuple[str, bytes] | None:
    """For a received ``raw`` payload decoded as ``msg``: (its MAC, the bytes it covers).

    ``None`` when the message carries no MAC where the MAC rule puts it.
    """
    field = mac_field(msg)
    mac = msg.get(field)
    if mac is None or not raw.endswith(mac.encode("ascii", "replace")):
        return None
    return mac, raw[:-MAC_LEN]


def redact(msg: Mapping[str, str]) -> dict[str, str]:
    """A copy safe to log: PAN masked, PIN block and MAC replaced by a marker."""
    out = dict(msg)
    if "2" in out:
        out["2"] = mask_pan(out["2"])
    for f in ("52", "64", "128"):
        if f in out:
            out[f] = "[redacted]"
    return out
