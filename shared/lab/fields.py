"""Field-by-field explanation of a (masked) ISO-8583 message: number, name, format, value
and the meaning of the codes paylab uses (processing code, response code, network
management code, field 90). Pure; shared by ``paylab trace --fields`` and ``paylab decode``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.iso.codes import describe
from shared.iso.messages import (
    NMI_ECHO,
    NMI_SIGN_OFF,
    NMI_SIGN_ON,
    PC_BILL_INQUIRY,
    PC_BILL_PAYMENT,
    parse_field90,
)
from shared.iso.spec import SPEC

_PROCESSING = {PC_BILL_INQUIRY: "bill inquiry", PC_BILL_PAYMENT: "bill payment"}
_NMI = {NMI_SIGN_ON: "sign-on", NMI_SIGN_OFF: "sign-off", NMI_ECHO: "echo test"}


def _order(key: str) -> tuple[int, int]:
    if key == "t":
        return (0, 0)
    if key in ("p", "b"):  # bitmaps, when present
        return (0, 1)
    return (1, int(key)) if key.isdigit() else (2, 0)


def field_format(key: str) -> str:
    """The field's format as the spec has it, e.g. ``n 6``, ``an ..25`` (LL), ``b 64``."""
    spec = SPEC.get(key)
    if spec is None:
        return ""
    prefix = {0: "", 2: "..", 3: "..."}.get(int(spec.get("len_type", 0)), "")
    kind = "b" if spec.get("data_enc") == "b" else "an"
    return f"{kind} {prefix}{spec.get('max_len', '')}"


def meaning(key: str, value: str) -> str:
    """What a code means (empty when the field has no coded meaning or is unknown)."""
    if key == "3":
        return _PROCESSING.get(value, "unknown processing code")
    if key == "39":
        return describe(value)
    if key == "70":
        return _NMI.get(value, "unknown network management code")
    if key == "90":
        try:
            f90 = parse_field90(value)
        except ValueError:
            return "not 42 digits"
        return f"original MTI {f90['mti']}, STAN {f90['stan']}, sent {f90['datetime']}"
    if key == "t":
        return {
            "0200": "financial request",
            "0210": "financial response",
            "0220": "financial advice",
            "0230": "advice response",
            "0420": "reversal advice",
            "0430": "reversal response",
            "0800": "network management request",
            "0810": "network management response",
        }.get(value, "")
    return ""


def field_rows(fields: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per field: ``field``, ``name``, ``format``, ``value``, ``meaning``."""
    rows = []
    for key in sorted(fields, key=_order):
        spec = SPEC.get(key, {})
        name = "Message type (MTI)" if key == "t" else str(spec.get("desc", "")) or f"field {key}"
        rows.append(
            {
                "field": key,
                "name": name,
                "format": field_format(key) if key != "t" else "n 4",
                "value": fields[key],
                "meaning": meaning(key, fields[key]),
            }
        )
    return rows


def explain(fields: Mapping[str, str]) -> list[str]:
    """The rows of :func:`field_rows` as lines of text."""
    out = []
    for r in field_rows(fields):
        label = "" if r["field"] == "t" else f"{r['field']:>3}"
        meaning_text = f"  = {r['meaning']}" if r["meaning"] else ""
        out.append(f"{label:>4} {r['name'][:38]:<38} {r['format']:<8} {r['value']}{meaning_text}")
    return out
