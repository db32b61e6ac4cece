"""ISO-8583 encode/decode over :data:`shared.spec.SPEC`, plus MAC placement.

The codec is a thin, allocation-conscious wrapper on pyiso8583. ``encode`` never mutates
the caller's dict (pyiso8583 adds bitmap keys to the dict it is given). ``decode`` turns
every library error into :class:`~shared.errors.DecodeError` so callers handle one type.

MAC rule: the MAC is the last data element of a message: field 64 when the message has
no secondary bitmap, field 128 when it has one. The MAC is computed over the encoded
message up to (not including) the 16 MAC characters, with the MAC's bitmap bit set.
"""

from __future__ import annotations

from collections.abc import Mapping

import iso8583
from iso8583.decoder import DecodeError as _LibDecodeError
from iso8583.encoder import EncodeError as _LibEncodeError

from shared.errors import DecodeError, ValidationError
from shared.messages import Message
from shared.pan import mask_pan
from shared.spec import SPEC

MAC_LEN = 16
_MAC_PLACEHOLDER = "0" * MAC_LEN


def encode(msg: Mapping[str, str]) -> bytes:
    """Encode a message dict. Raises :class:`ValidationError` when a field does not fit."""
    doc = {k: v for k, v in msg.items() if k not in ("p", "1")}
    try:
        raw, _ = iso8583.encode(doc, SPEC)
    except _LibEncodeError as exc:
        raise ValidationError(f"cannot encode: {exc}", field=getattr(exc, "field", None)) from None
    return bytes(raw)


def decode(data: bytes) -> Message:
    """Decode one payload into a message dict (bitmap keys removed).

    Raises :class:`DecodeError` for anything pyiso8583 rejects (bad MTI, bad bitmap,
    truncated or extra data) and for non-ASCII bytes.
    """
    try:
        doc, _ = iso8583.decode(data, SPEC)
    except _LibDecodeError as exc:
        raise DecodeError(str(exc)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"undecodable bytes: {type(exc).__name__}") from None
    mti = doc.get("t", "")
    if not (mti.isascii() and mti.isdigit()):
        raise DecodeError(f"MTI {mti!r} is not 4 digits")
    doc.pop("p", None)
    doc.pop("1", None)
    return doc


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
