"""Differential tests: the codec's fast path against pyiso8583, the codec of record.

The fast path (``shared.iso.codec._fast_encode`` / ``_fast_decode``) must either return exactly
what pyiso8583 returns over :data:`shared.iso.spec.SPEC` or return ``None`` so the library
decides. It must never return a result where the library raises.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import iso8583
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import DecodeError, ValidationError
from shared.iso import codec
from shared.iso.spec import SPEC
from tests.test_codec import BAD_PAYLOADS, MESSAGES

FIELDS = [n for n in range(2, 129) if n != 65]
ASCII = st.characters(min_codepoint=0, max_codepoint=127)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _lib_encode(msg: dict[Any, Any]) -> bytes | Exception:
    """What ``codec.encode`` did before the fast path: the library's bytes, or its error."""
    doc = {k: v for k, v in msg.items() if k not in ("p", "1")}
    try:
        raw, _ = iso8583.encode(doc, SPEC)
    except Exception as exc:  # any error counts: the fast path must then give None
        return exc
    return bytes(raw)


def _lib_decode(raw: Any) -> dict[str, str] | Exception:
    """The library's decode with the bitmap keys removed, or the error it raised."""
    try:
        doc, _ = iso8583.decode(raw, SPEC)
    except Exception as exc:  # any error counts: the fast path must then give None
        return exc
    doc.pop("p", None)
    doc.pop("1", None)
    return doc


def _check_decode(raw: Any) -> dict[str, str] | None:
    """Assert the fast decode agrees with the library on ``raw``; return the fast result."""
    fast = codec._fast_decode(raw)
    lib = _lib_decode(raw)
    if isinstance(lib, Exception):
        assert fast is None, (raw, lib)
    elif fast is not None:
        assert list(fast.items()) == list(lib.items())  # same keys, values and order
    return fast


def _check_encode(msg: dict[Any, Any]) -> bytes | None:
    """Assert the fast encode agrees with the library on ``msg``; return the fast result."""
    before = dict(msg)
    fast = codec._fast_encode(msg)
    assert msg == before  # the fast path never mutates its input
    lib = _lib_encode(msg)
    if isinstance(lib, Exception):
        assert fast is None, (msg, lib)
    elif fast is not None:
        assert type(fast) is bytes
        assert fast == lib
    return fast


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, str]:
    """A random message that fits SPEC: random fields, ASCII values of allowed lengths."""
    numbers = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=16))
    msg = {"t": draw(st.text("0123456789", min_size=4, max_size=4))}
    for n in numbers:
        field = SPEC[str(n)]
        if field["len_type"] == 0:
            size = field["max_len"]
        else:
            size = draw(st.integers(min_value=0, max_value=field["max_len"]))
        msg[str(n)] = draw(st.text(ASCII, min_size=size, max_size=size))
    return msg


def _layout(msg: dict[str, str]) -> Iterator[tuple[int, int]]:
    """(offset, width) of every length prefix in the encoding of ``msg``."""
    raw, enc = iso8583.encode(dict(msg), SPEC)
    pos = 4 + len(enc["p"]["data"]) + (len(enc["1"]["data"]) if "1" in enc else 0)
    for key in sorted((k for k in enc if k.isdigit() and k != "1"), key=int):
        width = len(enc[key]["len"])
        if width:
            yield pos, width
        pos += width + len(enc[key]["data"])
    assert pos == len(raw)


ODD_CHARS = [b"+", b" ", b"_", b"-", b"x", b"g", b"\x00", b"\x80", b"\xff", b"a", b"f", b"9"]


@st.composite
def mutated_encodings(draw: st.DrawFn) -> bytes:
    """A valid encoding with one to three mutations of the kinds that break a parser."""
    msg = draw(valid_messages())
    raw = codec.encode(msg)
    prefixes = list(_layout(msg))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(
            st.sampled_from(
                [
                    "flip",
                    "insert",
                    "delete",
                    "replace",
                    "odd",
                    "prefix",
                    "prefix-odd",
                    "bitmap",
                    "append",
                    "truncate",
                    "non-ascii",
                ]
            )
        )
        at = draw(st.integers(min_value=0, max_value=max(len(raw) - 1, 0)))
        byte = draw(st.integers(min_value=0, max_value=255))
        if kind == "flip" and raw:
            raw = raw[:at] + bytes([raw[at] ^ (byte or 1)]) + raw[at + 1 :]
        elif kind == "insert":
            raw = raw[:at] + bytes([byte]) + raw[at:]
        elif kind == "delete":
            raw = raw[:at] + raw[at + 1 :]
        elif kind == "replace":
            raw = raw[:at] + bytes([byte]) + raw[at + 1 :]
        elif kind == "odd":
            raw = raw[:at] + draw(st.sampled_from(ODD_CHARS)) + raw[at + 1 :]
        elif kind == "prefix" and prefixes:
            start, width = draw(st.sampled_from(prefixes))
            digits = draw(st.text("0123456789", min_size=width, max_size=width))
            raw = raw[:start] + digits.encode() + raw[start + width :]
        elif kind == "prefix-odd" and prefixes:
            start, width = draw(st.sampled_from(prefixes))
            i = start + draw(st.integers(min_value=0, max_value=width - 1))
            raw = raw[:i] + draw(st.sampled_from(ODD_CHARS)) + raw[i + 1 :]
        elif kind == "bitmap":
            i = draw(st.integers(min_value=4, max_value=35))
            raw = raw[:i] + draw(st.sampled_from([*ODD_CHARS, b"0", b"8", b"F"])) + raw[i + 1 :]
        elif kind == "append":
            raw += draw(st.binary(min_size=1, max_size=8))
        elif kind == "truncate":
            raw = raw[:at]
        elif kind == "non-ascii":
            raw = raw[:at] + bytes([128 + byte % 128]) + raw[at + 1 :]
    return raw


@st.composite
def plausible_payloads(draw: st.DrawFn) -> bytes:
    """An MTI, a hex bitmap (either case, with or without a secondary), then digit-rich data."""
    mti = draw(st.text("0123456789", min_size=4, max_size=4)).encode()
    hexdigits = "0123456789abcdefABCDEF"
    bitmap = draw(st.text(hexdigits, min_size=16, max_size=16))
    if draw(st.booleans()):
        bitmap = "8" + bitmap[1:] + draw(st.text(hexdigits, min_size=16, max_size=16))
    body = draw(st.text(st.sampled_from("0123456789AZ+ -_"), max_size=120))
    return mti + bitmap.encode() + body.encode()


ODD_KEYS: list[Any] = ["01", "65", "129", "0", "h", "p", "1", "002", " 2", "2 ", "abc", "²", 2]
ODD_VALUES: list[Any] = [
    None,
    7,
    b"123456",
    "é",
    "123456\x80",
    "0" * 1000,
    "",
    "123456",
    "12",
]


class _Str(str):
    """A str subclass: the fast path leaves such values to the library."""


@st.composite
def odd_dicts(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid message with odd keys, odd values or a bad MTI mixed in."""
    msg: dict[Any, Any] = dict(draw(valid_messages()))
    keys = [k for k in msg if k != "t"]
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(st.sampled_from(["key", "value", "mti", "long", "short", "subclass", "drop"]))
        if kind == "key":
            msg[draw(st.sampled_from(ODD_KEYS))] = draw(st.sampled_from(ODD_VALUES))
        elif kind == "value" and keys:
            msg[draw(st.sampled_from(keys))] = draw(st.sampled_from(ODD_VALUES))
        elif kind == "mti":
            msg["t"] = draw(st.sampled_from(["020", "02000", "02é0", "ABCD", 200, _Str("0200")]))
        elif kind == "long" and keys:
            key = draw(st.sampled_from(keys))
            msg[key] = str(msg[key]) + "9"
        elif kind == "short" and keys:
            key = draw(st.sampled_from(keys))
            msg[key] = str(msg[key])[:-1]
        elif kind == "subclass" and keys:
            key = draw(st.sampled_from(keys))
            msg[key] = _Str(msg[key])
        elif kind == "drop":
            msg.pop("t", None)
    return msg


# ---------------------------------------------------------------------------------------------
# 1. Valid messages: the fast path handles them and equals the library
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(msg=valid_messages())
def test_fast_path_equals_the_library_on_valid_messages(msg: dict[str, str]) -> None:
    lib = _lib_encode(msg)
    assert isinstance(lib, bytes)
    assert codec._fast_encode(msg) == lib
    assert codec._fast_encode({**msg, "p": "stale", "1": "stale"}) == lib
    decoded = _check_decode(lib)
    assert decoded is not None  # an ordinary message takes the fast path
    assert decoded == msg
    assert _check_decode(bytearray(lib)) == msg
    # A lowercase bitmap is still ordinary and decodes to the same message.
    bitmap_end = 36 if lib[4:5] in b"89ABCDEF" else 20
    lower = lib[:4] + lib[4:bitmap_end].lower() + lib[bitmap_end:]
    assert _check_decode(lower) == msg


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_fast_path_handles_every_message_kind(name: str) -> None:
    msg = MESSAGES[name]
    raw = codec._fast_encode(msg)
    assert raw is not None
    assert raw == _lib_encode(msg)
    assert codec._fast_decode(raw) == msg


# ---------------------------------------------------------------------------------------------
# 2. Anything else: the fast path equals the library or stands aside
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(raw=mutated_encodings())
def test_fast_decode_of_mutated_encodings(raw: bytes) -> None:
    _check_decode(raw)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_fast_decode_of_random_bytes(raw: bytes) -> None:
    _check_decode(raw)


@SETTINGS
@given(raw=plausible_payloads())
def test_fast_decode_of_plausible_payloads(raw: bytes) -> None:
    _check_decode(raw)


@SETTINGS
@given(msg=odd_dicts())
def test_fast_encode_of_odd_dicts(msg: dict[Any, Any]) -> None:
    _check_encode(msg)


def _field(number: int, value: str) -> bytes:
    """One encoded data element of SPEC (length prefix + data)."""
    len_type = SPEC[str(number)]["len_type"]
    return (f"{len(value):0{len_type}d}" if len_type else "").encode() + value.encode()


def _lowercase_bitmap(raw: bytes) -> bytes:
    return raw[:4] + raw[4:20].lower() + raw[20:]


ONLY_48 = b"0200" + b"0000000000010000"  # primary bitmap announcing field 48 only

DECODE_EDGES: dict[str, Any] = {
    "19 bytes": b"0200" + b"000000000000000",
    "plus in bitmap": b"0200" + b"+000000000010000" + _field(48, "B1"),
    "space in bitmap": b"0200" + b"00 0000000010000" + _field(48, "B1"),
    "underscore in bitmap": b"0200" + b"0_00000000010000" + _field(48, "B1"),
    "0x bitmap": b"0200" + b"0x00000000010000" + _field(48, "B1"),
    "tertiary bit 65": b"0200" + b"8000000000000000" + b"8000000000000000",
    "secondary truncated": b"0200" + b"8000000000000000" + b"00000000",
    "plus in length": ONLY_48 + b"+02B1",
    "space in length": ONLY_48 + b" 02B1",
    "underscore in length": ONLY_48 + b"0_2B1",
    "minus in length": ONLY_48 + b"-01B1",
    "length above max": ONLY_48 + b"033" + b"B" * 33,
    "length truncated": ONLY_48 + b"02",
    "data truncated": ONLY_48 + b"005B1",
    "extra data": ONLY_48 + _field(48, "B1") + b"X",
    "non-ASCII data": ONLY_48 + b"002B\xe9",
    "non-ASCII length": ONLY_48 + b"0\xb12B1",
    "str input": "0800" + "0" * 16,
    "memoryview input": memoryview(b"0800" + b"0" * 16),
    "lowercase bitmap": _lowercase_bitmap(codec.encode(MESSAGES["0200-payment"])),
    "zero-length variable field": ONLY_48 + b"000",
}


@pytest.mark.parametrize("name", sorted(DECODE_EDGES))
def test_fast_decode_edges(name: str) -> None:
    raw = DECODE_EDGES[name]
    fast = _check_decode(raw)
    if name in ("lowercase bitmap", "zero-length variable field"):
        assert fast is not None  # still ordinary
    else:
        assert fast is None


# ---------------------------------------------------------------------------------------------
# 3. Public encode/decode: same results and errors as the library alone
# ---------------------------------------------------------------------------------------------


def _outcome(func: Callable[[Any], Any], arg: Any) -> Any:
    try:
        return ("ok", func(arg))
    except Exception as exc:  # compare the exception type, whatever it is
        return ("raised", type(exc))


def _library_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_TABLE", None)


PAYMENT = MESSAGES["0200-payment"]
RESPONSE = MESSAGES["0210"]
REVERSAL = MESSAGES["0420"]
assert "62" in RESPONSE and "90" in REVERSAL and "128" in REVERSAL

ENCODE_CASES: dict[str, dict[Any, Any]] = {
    "0200 payment": PAYMENT,
    "0210 with field 62": RESPONSE,
    "0420 with fields 90 and 128": REVERSAL,
    "stale bitmap keys": {**REVERSAL, "p": "0" * 16, "1": 5},
    "field 128 alone": {"t": "0800", "128": "0" * 16},
    "MTI only": {"t": "0800"},
    "letters in the MTI": {"t": "ABCD"},
    "no MTI": {"3": "000000"},
    "short MTI": {**PAYMENT, "t": "020"},
    "non-ASCII MTI": {**PAYMENT, "t": "02é0"},
    "int MTI": {**PAYMENT, "t": 200},
    "fixed field too short": {**PAYMENT, "4": "12345"},
    "fixed field too long": {**PAYMENT, "3": "5000000"},
    "variable field too long": {**PAYMENT, "48": "B" * 33},
    "PAN too long": {**PAYMENT, "2": "4" * 20},
    "non-str value": {**PAYMENT, "48": 12},
    "bytes value": {**PAYMENT, "48": b"BILL"},
    "non-ASCII value": {**PAYMENT, "48": "BILL-é"},
    "key 01": {**PAYMENT, "01": "x"},
    "key 65": {**PAYMENT, "65": "x"},
    "key 129": {**PAYMENT, "129": "x"},
    "key h": {**PAYMENT, "h": "HEAD"},
    "key 002": {**PAYMENT, "002": PAYMENT["2"]},
    "extra non-numeric key": {**PAYMENT, "note": "x"},
    "int key": {**PAYMENT, 3: "000000"},
}


def test_public_encode_errors_keep_their_field() -> None:
    with pytest.raises(ValidationError) as err:
        codec.encode(ENCODE_CASES["variable field too long"])
    assert err.value.field == "48"


DECODE_CASES: dict[str, Any] = {
    **{f"valid {name}": codec.encode(msg) for name, msg in MESSAGES.items()},
    **{f"bad {name}": raw for name, raw in BAD_PAYLOADS.items()},
    **{f"edge {name}": raw for name, raw in DECODE_EDGES.items()},
    "letters in the MTI": b"ABCD" + b"0" * 16,
}


PUBLIC_CASES = [("encode", name) for name in sorted(ENCODE_CASES)] + [
    ("decode", name) for name in sorted(DECODE_CASES)
]


@pytest.mark.parametrize(("kind", "name"), PUBLIC_CASES)
def test_public_codec_matches_the_library(
    kind: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fast path on, then off: the same result or the same exception type."""
    public: Callable[[Any], Any]
    fast_path: Callable[[Any], Any]
    if kind == "encode":
        public, fast_path, value = codec.encode, codec._fast_encode, ENCODE_CASES[name]
    else:
        public, fast_path, value = codec.decode, codec._fast_decode, DECODE_CASES[name]
    fast = _outcome(public, value)
    _library_only(monkeypatch)
    assert fast_path(value) is None
    assert _outcome(public, value) == fast
    if kind == "decode" and (name.startswith("bad ") or name == "letters in the MTI"):
        assert fast == ("raised", DecodeError)


# ---------------------------------------------------------------------------------------------
# The fast path turns itself off for a spec it was not built for
# ---------------------------------------------------------------------------------------------


def test_table_covers_every_field_of_spec() -> None:
    table = codec._build_table(SPEC)
    assert table is not None
    assert sorted(table) == FIELDS
    for number, (len_type, max_len) in table.items():
        field = SPEC[str(number)]
        assert len_type == field["len_type"] in (0, 2, 3)
        assert max_len == field["max_len"]
        assert field["data_enc"] == field["len_enc"] == "ascii"


def _modified(path: tuple[str, str], value: Any) -> dict[str, dict[str, Any]]:
    spec = copy.deepcopy(SPEC)
    spec[path[0]][path[1]] = value
    return spec


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("h", "max_len"), 4),
        (("t", "data_enc"), "b"),
        (("p", "data_enc"), "b"),
        (("1", "data_enc"), "b"),
        (("2", "data_enc"), "b"),
        (("52", "data_enc"), "cp500"),
        (("35", "len_enc"), "b"),
        (("35", "len_enc"), "bcd"),
        (("2", "len_count"), "nibbles"),
        (("2", "len_type"), 4),
        (("2", "max_len"), "19"),
    ],
)
def test_fast_path_is_disabled_for_another_spec(path: tuple[str, str], value: Any) -> None:
    assert codec._build_table(_modified(path, value)) is None


def test_a_variable_max_len_is_capped_by_its_prefix_width() -> None:
    table = codec._build_table(_modified(("48", "max_len"), 5000))
    assert table is not None
    assert table[48] == (3, 999)


def test_disabled_fast_path_leaves_everything_to_the_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = codec.encode(PAYMENT)
    _library_only(monkeypatch)
    assert codec._fast_encode(PAYMENT) is None
    assert codec._fast_decode(raw) is None
    assert codec.encode(PAYMENT) == raw
    assert codec.decode(raw) == PAYMENT
