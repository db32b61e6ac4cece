"""Decoding and building messages by hand (pure: no sockets, no clock unless given).

* :func:`read_bytes` turns what a person pastes (hex with or without spaces, base64, raw
  bytes) into bytes; :func:`strip_header` removes a length header when there is one;
  :func:`decode_payload` decodes, and every failure is a :class:`WireInputError` that says
  what is wrong and where (which field, which byte), never a traceback.
* :func:`build_message` fills a template: STAN, field 7, RRN and the terminal's identity
  when absent, the PIN block under the test TPK and the MAC under the test TAK on request.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from shared import crypto
from shared.errors import DecodeError, PaylabError, ValidationError
from shared.iso import codec
from shared.iso.framing import HeaderKind
from shared.iso.messages import Message, local_time_date, transmission_datetime

_HEX_RE = re.compile(r"^[0-9A-Fa-f\s:]+$")
_HEX_CHARS = frozenset("0123456789abcdefABCDEF: \n\t\r")
_B64_RE = re.compile(r"^[A-Za-z0-9+/=\s]+$")


class WireInputError(PaylabError):
    """Input that is not a message (bad encoding, bad header, undecodable, bad template)."""


def read_bytes(data: bytes, fmt: str = "auto") -> bytes:
    """The bytes ``data`` stands for: ``hex``, ``base64``, ``raw``, or ``auto`` (hex if it
    is all hex digits, else base64 if it looks like it, else the bytes themselves)."""
    text = data.decode("ascii", "replace").strip()
    if fmt == "raw":
        return data
    if fmt in ("hex", "auto") and text and _HEX_RE.match(text):
        digits = re.sub(r"[\s:]", "", text)
        if len(digits) % 2:
            if fmt == "hex":
                raise WireInputError(f"hex input has an odd number of digits ({len(digits)})")
        else:
            return bytes.fromhex(digits)
    if fmt == "hex":
        bad = next((i for i, c in enumerate(text) if c not in _HEX_CHARS), 0)
        raise WireInputError(f"not hex: character {bad + 1} is {text[bad : bad + 1]!r}")
    if fmt in ("base64", "auto") and text and _B64_RE.match(text) and fmt != "raw":
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            if fmt == "base64":
                raise WireInputError(f"not base64: {exc}") from None
    if fmt == "base64":
        raise WireInputError("not base64")
    return data


def strip_header(data: bytes, header: str = "auto") -> tuple[bytes, str]:
    """(payload, the header found: ``binary2``, ``ascii4`` or ``none``).

    ``auto`` removes a header when its length matches the rest exactly; the others insist.
    """
    if header in ("binary2", "auto") and len(data) >= 2:
        if int.from_bytes(data[:2], "big") == len(data) - 2:
            return data[2:], "binary2"
        if header == "binary2":
            raise WireInputError(
                f"binary2 header says {int.from_bytes(data[:2], 'big')} bytes, "
                f"{len(data) - 2} follow"
            )
    if header in ("ascii4", "auto") and len(data) >= 4 and data[:4].isdigit():
        if int(data[:4]) == len(data) - 4:
            return data[4:], "ascii4"
        if header == "ascii4":
            raise WireInputError(
                f"ascii4 header says {int(data[:4])} bytes, {len(data) - 4} follow"
            )
    if header == "ascii4":
        raise WireInputError("no ascii4 header (the first 4 bytes are not digits)")
    if header == "binary2":
        raise WireInputError("too short for a binary2 header")
    return data, "none"


def decode_payload(payload: bytes) -> Message:
    """Decode one message (no length header). Raises :class:`WireInputError` explaining
    where decoding stopped."""
    if not payload:
        raise WireInputError("empty input: no message")
    bad = next((i for i, b in enumerate(payload) if not 0x20 <= b <= 0x7E), None)
    if bad is not None:  # paylab's spec is all ASCII: MTI, hex bitmaps, fields
        raise WireInputError(
            f"byte {bad} (0x{payload[bad]:02x}) is not printable ASCII; paylab's messages "
            "are all ASCII (is there a length header the --header option should remove?)"
        )
    if len(payload) < 4 or not payload[:4].isdigit():
        raise WireInputError(
            f"the message must start with a 4-digit MTI; it starts with {payload[:4]!r}"
        )
    try:
        return codec.decode(payload)
    except DecodeError as exc:
        raise WireInputError(f"cannot decode: {exc}") from None


def verify_mac(payload: bytes, msg: Mapping[str, str], tak: bytes) -> bool | None:
    """True/False: the MAC of ``payload`` under ``tak``; None when the message has none."""
    placed = codec.mac_input_of_received(payload, msg)
    if placed is None:
        return None
    mac, data = placed
    return secrets.compare_digest(crypto.mac_alg3(tak, data).hex().upper(), mac.upper())


@dataclass(frozen=True, slots=True)
class Template:
    """A message template: fields, an optional clear PIN (for field 52), MAC or not."""

    name: str
    description: str
    fields: dict[str, str]
    pin: str | None = None
    mac: bool = False


def parse_template(name: str, data: Any) -> Template:
    """A :class:`Template` from a JSON document. Raises :class:`WireInputError`."""
    if not isinstance(data, dict) or not isinstance(data.get("fields"), dict):
        raise WireInputError(f"template {name}: expected an object with a 'fields' object")
    fields = data["fields"]
    for k, v in fields.items():
        if not (k == "t" or (k.isdigit() and 2 <= int(k) <= 128)) or not isinstance(v, str):
            raise WireInputError(
                f"template {name}: field {k!r} must be 't' or 2-128, with a string value"
            )
    if "t" not in fields:
        raise WireInputError(f"template {name}: no MTI (field 't')")
    pin = data.get("pin")
    if pin is not None and not (isinstance(pin, str) and pin.isdigit() and 4 <= len(pin) <= 12):
        raise WireInputError(f"template {name}: pin must be 4-12 digits")
    return Template(
        name, str(data.get("description", "")), dict(fields), pin, bool(data.get("mac"))
    )


def shipped_templates() -> dict[str, Template]:
    """The templates shipped with paylab, by name."""
    out = {}
    for entry in resources.files("shared.lab.wire").joinpath("templates").iterdir():
        if entry.name.endswith(".json"):
            name = entry.name[: -len(".json")]
            out[name] = parse_template(name, json.loads(entry.read_text()))
    return out


def parse_field_options(options: list[str]) -> dict[str, str]:
    """``N=VALUE`` options (``t=0200`` or ``mti=0200`` for the MTI). Raises on bad ones."""
    out = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        key = key.strip().lower()
        if key == "mti":
            key = "t"
        if not sep or not (key == "t" or (key.isdigit() and 2 <= int(key) <= 128)):
            raise WireInputError(f"--field {opt!r}: expected N=VALUE with N from 2 to 128 (or mti)")
        out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class Identity:
    """What :func:`build_message` fills in: the terminal and its test keys."""

    acquirer_id: str
    terminal_id: str
    merchant_id: str
    currency: str
    tpk: bytes
    tak: bytes


def build_message(
    template: Template,
    overrides: Mapping[str, str],
    ident: Identity,
    stan: str,
    *,
    now: datetime | None = None,
    mac: bool | None = None,
) -> Message:
    """The template's fields with ``overrides`` on top, the rest filled in when absent:
    field 7, 11 (``stan``), 12/13, and for financial messages 32, 37, 41, 42, 49; field 52
    from the template's PIN; the MAC when the template (or ``mac``) asks. An override of
    ``""`` removes a field (to send a malformed message on purpose)."""
    now = now or datetime.now(UTC)
    msg: Message = dict(template.fields)
    msg.update(overrides)
    mti = msg["t"]
    fill = {"7": transmission_datetime(now), "11": stan}
    if not mti.startswith("08"):
        t12, t13 = local_time_date()
        fill.update(
            {
                "12": t12,
                "13": t13,
                "32": ident.acquirer_id,
                "37": f"{now.year % 10}{now.timetuple().tm_yday:03d}{now.hour:02d}{stan}",
                "41": ident.terminal_id,
                "42": ident.merchant_id,
                "49": ident.currency,
            }
        )
    for k, v in fill.items():
        msg.setdefault(k, v)
    if template.pin and "52" not in overrides and "2" in msg:
        try:
            msg["52"] = crypto.encrypt_pin_block(template.pin, msg["2"], ident.tpk)
        except (ValueError, PaylabError) as exc:
            raise WireInputError(f"cannot make the PIN block: {exc}") from None
    msg = {k: v for k, v in msg.items() if v != ""}
    if mac if mac is not None else template.mac:
        try:
            field, data = codec.encode_for_mac(msg)
        except ValidationError as exc:
            raise WireInputError(f"cannot encode: {exc}") from None
        msg[field] = crypto.mac_alg3(ident.tak, data).hex().upper()
    return msg


def encode_message(msg: Mapping[str, str]) -> bytes:
    """Encode, or explain why not (:class:`WireInputError`)."""
    try:
        return codec.encode(msg)
    except ValidationError as exc:
        raise WireInputError(f"cannot encode: {exc}") from None


HEADER_KINDS = {k.value: k for k in HeaderKind}
