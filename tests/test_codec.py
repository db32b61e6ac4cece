"""Tests for shared.iso.codec: ISO-8583 encode/decode over paylab's spec, MAC placement,
redaction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm.keyfile import load_key_file
from shared.errors import DecodeError, ValidationError
from shared.iso import codec
from shared.iso.messages import Message, make_response
from tests.support import TERTIARY_FRAME, terminal_builder

KEYS = load_key_file()
PAN = "4761739001010010"
PIN = "1234"


def _messages() -> dict[str, Message]:
    """One message of every kind paylab puts on the wire, MACed like the real thing."""
    b = terminal_builder("PAYLAB01", stan_start=41)
    inquiry = b.inquiry("BILL-0001")
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    response = b.sign(make_response(payment, "00", f38="A1B2C3", f62="PLN|JANE DOE"))
    advice = {k: v for k, v in payment.items() if k not in ("52", "64")}
    advice["t"] = "0220"
    advice = b.sign(advice)
    reversal = b.reversal(payment)
    network = b.sign({"t": "0800", "7": payment["7"], "11": "000099", "70": "301"})
    return {
        "0200-inquiry": inquiry,
        "0200-payment": payment,
        "0210": response,
        "0220": advice,
        "0420": reversal,
        "0800": network,
    }


MESSAGES = _messages()
PAYMENT_RAW = codec.encode(MESSAGES["0200-payment"])


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_roundtrip(name: str) -> None:
    msg = MESSAGES[name]
    raw = codec.encode(msg)
    assert raw[:4] == msg["t"].encode()
    decoded = codec.decode(raw)
    assert decoded == msg
    assert codec.encode(decoded) == raw


@pytest.mark.parametrize(
    ("name", "secondary", "mac"),
    [
        ("0200-inquiry", False, "64"),
        ("0200-payment", False, "64"),
        ("0210", False, "64"),
        ("0220", False, "64"),
        ("0420", True, "128"),
        ("0800", True, "128"),
    ],
)
def test_secondary_bitmap_and_mac_placement(name: str, secondary: bool, mac: str) -> None:
    msg = MESSAGES[name]
    raw = codec.encode(msg)
    primary = int(raw[4:20], 16)
    assert bool(primary >> 63) is secondary  # bit 1 announces the secondary bitmap
    assert codec.mac_field(msg) == mac
    assert mac in msg
    assert ("64" if mac == "128" else "128") not in msg
    assert raw.endswith(msg[mac].encode())


def test_field90_and_field70_travel_in_the_secondary_bitmap() -> None:
    reversal = codec.encode(MESSAGES["0420"])
    secondary = int(reversal[20:36], 16)
    assert secondary >> (128 - 90) & 1  # field 90
    assert secondary & 1  # field 128 (MAC)
    network = codec.encode(MESSAGES["0800"])
    secondary = int(network[20:36], 16)
    assert secondary >> (128 - 70) & 1  # field 70


def test_decode_returns_no_bitmap_keys() -> None:
    for msg in MESSAGES.values():
        decoded = codec.decode(codec.encode(msg))
        assert "p" not in decoded
        assert "1" not in decoded


def test_decode_results_are_independent() -> None:
    first = codec.decode(PAYMENT_RAW)
    first["4"] = "999999999999"
    assert codec.decode(PAYMENT_RAW)["4"] == MESSAGES["0200-payment"]["4"]


def test_encode_does_not_mutate_its_input() -> None:
    for msg in MESSAGES.values():
        before = dict(msg)
        codec.encode(msg)
        assert msg == before
        assert "p" not in msg
        assert "1" not in msg


def test_encode_ignores_stale_bitmap_keys() -> None:
    msg = MESSAGES["0420"]
    stale = {**msg, "p": "0" * 16, "1": "F" * 16}
    assert codec.encode(stale) == codec.encode(msg)
    assert stale["p"] == "0" * 16  # still the caller's value


@pytest.mark.parametrize(
    ("field", "value"),
    [("3", "5000000"), ("2", "4" * 20), ("48", "B" * 33), ("4", "12345")],
)
def test_encode_rejects_a_field_that_does_not_fit(field: str, value: str) -> None:
    msg = {**MESSAGES["0200-payment"], field: value}
    with pytest.raises(ValidationError) as err:
        codec.encode(msg)
    assert err.value.field == field


# ---------------------------------------------------------------------------------------------
# Decode errors
# ---------------------------------------------------------------------------------------------


def _with_byte(raw: bytes, index: int, value: int) -> bytes:
    return raw[:index] + bytes([value]) + raw[index + 1 :]


BAD_PAYLOADS = {
    "empty": b"",
    "short MTI": b"02",
    "non-ASCII MTI": b"\xff200" + PAYMENT_RAW[4:],
    "non-numeric MTI": b"02X0" + PAYMENT_RAW[4:],
    "MTI only": b"0200",
    "truncated bitmap": PAYMENT_RAW[:12],
    "non-hex bitmap": b"0200" + b"ZZZZZZZZZZZZZZZZ" + PAYMENT_RAW[20:],
    "bitmap announcing missing fields": PAYMENT_RAW[:20],
    "truncated data": PAYMENT_RAW[:-3],
    "truncated MAC": PAYMENT_RAW[:-16],
    "extra trailing bytes": PAYMENT_RAW + b"0",
    "non-ASCII data": PAYMENT_RAW.replace(b"BILL-0001", b"BILL-\xe9001"),
    "non-ASCII PAN": _with_byte(PAYMENT_RAW, 24, 0xB2),
    # A secondary bitmap with bit 65 set: pyiso8583 reads a tertiary bitmap naming field 132.
    "tertiary bitmap (bit 65)": TERTIARY_FRAME,
    "empty tertiary bitmap (bit 65)": b"0800"
    + b"8220000000000000"
    + b"8000000000000000"
    + b"0000000000000000"
    + b"0314092653000123301",
    "oversize bill number": b"0200"
    + b"0000000000010000"  # field 48 only
    + b"033"
    + b"B" * 33,
}


@pytest.mark.parametrize("name", sorted(BAD_PAYLOADS))
def test_decode_error(name: str) -> None:
    with pytest.raises(DecodeError):
        codec.decode(BAD_PAYLOADS[name])


def test_decode_of_the_minimal_valid_message() -> None:
    # The "bitmap announcing missing fields" case above fails only because data is absent.
    assert codec.decode(b"0800" + b"0000000000000000") == {"t": "0800"}


# ---------------------------------------------------------------------------------------------
# MAC placement helpers
# ---------------------------------------------------------------------------------------------


def test_mac_field_rule() -> None:
    assert codec.mac_field({"t": "0200", "3": "500000"}) == "64"
    assert codec.mac_field({"t": "0200", "64": "0" * 16}) == "64"
    assert codec.mac_field({"t": "0420", "90": "0" * 42}) == "128"
    assert codec.mac_field({"t": "0800", "70": "301"}) == "128"
    # The MAC itself does not count as a secondary field.
    assert codec.mac_field({"t": "0200", "128": "0" * 16}) == "64"


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_encode_for_mac_and_received_input_agree(name: str) -> None:
    msg = MESSAGES[name]
    raw = codec.encode(msg)
    field, covered = codec.encode_for_mac(msg)
    assert field == codec.mac_field(msg)
    assert covered == raw[: -codec.MAC_LEN]
    placed = codec.mac_input_of_received(raw, codec.decode(raw))
    assert placed == (msg[field], covered)


def test_encode_for_mac_of_an_unsigned_message_sets_the_mac_bit() -> None:
    # The covered bytes are the same whether or not the message already carries a MAC.
    signed = MESSAGES["0200-payment"]
    unsigned = {k: v for k, v in signed.items() if k != "64"}
    assert codec.encode_for_mac(unsigned) == codec.encode_for_mac(signed)
    assert int(codec.encode_for_mac(unsigned)[1][4:20], 16) & 1  # bit 64 set
    reversal = {k: v for k, v in MESSAGES["0420"].items() if k != "128"}
    field, covered = codec.encode_for_mac(reversal)
    assert field == "128"
    assert int(covered[20:36], 16) & 1  # bit 128 set
    assert codec.encode_for_mac(reversal) == codec.encode_for_mac(MESSAGES["0420"])


def test_encode_for_mac_does_not_mutate_its_input() -> None:
    msg = dict(MESSAGES["0420"])
    before = dict(msg)
    codec.encode_for_mac(msg)
    assert msg == before


def test_mac_input_of_received_without_a_mac() -> None:
    msg = {k: v for k, v in MESSAGES["0200-payment"].items() if k != "64"}
    raw = codec.encode(msg)
    assert codec.mac_input_of_received(raw, codec.decode(raw)) is None


def test_mac_input_of_received_with_the_mac_in_the_wrong_field() -> None:
    # A secondary-bitmap message must carry its MAC in 128; a MAC in 64 is not found.
    msg = {k: v for k, v in MESSAGES["0420"].items() if k != "128"}
    msg["64"] = "0123456789ABCDEF"
    raw = codec.encode(msg)
    assert codec.mac_input_of_received(raw, codec.decode(raw)) is None


def test_mac_input_of_received_when_raw_does_not_end_with_the_mac() -> None:
    msg = MESSAGES["0200-payment"]
    assert codec.mac_input_of_received(codec.encode(msg)[:-1] + b"#", msg) is None


# ---------------------------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------------------------


def test_redact_masks_pan_and_hides_secrets() -> None:
    payment = MESSAGES["0200-payment"]
    before = dict(payment)
    red = codec.redact(payment)
    assert red["2"] == "476173******0010"
    assert red["52"] == "[redacted]"
    assert red["64"] == "[redacted]"
    assert payment == before  # a copy, not an edit
    for f in ("3", "4", "11", "41", "48"):
        assert red[f] == payment[f]
    text = repr(red)
    assert PAN not in text
    assert payment["52"] not in text
    assert payment["64"] not in text


def test_redact_hides_field_128() -> None:
    reversal = MESSAGES["0420"]
    red = codec.redact(reversal)
    assert red["128"] == "[redacted]"
    assert red["90"] == reversal["90"]
    assert "2" not in red


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200))
def test_decode_random_bytes_raises_only_decode_error(data: bytes) -> None:
    try:
        msg = codec.decode(data)
    except DecodeError:
        return
    assert isinstance(msg, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in msg.items())


@settings(max_examples=400, deadline=None)
@given(
    prefix=st.sampled_from([b"0200", b"0420", b"0800"]),
    bitmap=st.text(alphabet="0123456789ABCDEF", min_size=16, max_size=32),
    body=st.binary(max_size=120),
)
def test_decode_random_body_after_a_plausible_header(
    prefix: bytes, bitmap: str, body: bytes
) -> None:
    try:
        msg = codec.decode(prefix + bitmap.encode() + body)
    except DecodeError:
        return
    assert msg["t"] == prefix.decode()
    assert "p" not in msg


@settings(max_examples=400, deadline=None)
@given(
    index=st.integers(min_value=0, max_value=len(PAYMENT_RAW) - 1),
    value=st.integers(min_value=0, max_value=255),
)
def test_single_byte_mutation_decodes_or_raises_decode_error(index: int, value: int) -> None:
    mutated = _with_byte(PAYMENT_RAW, index, value)
    try:
        msg = codec.decode(mutated)
    except DecodeError:
        return
    assert isinstance(msg, dict)
    assert "p" not in msg
    assert "1" not in msg


def test_tertiary_bitmap_frame_is_a_decode_error_naming_bit_65() -> None:
    with pytest.raises(DecodeError, match="bit 65"):
        codec.decode(TERTIARY_FRAME)


#: Hex digits, mostly zero: bitmaps that name few fields, so decoding gets far.
_SPARSE = st.lists(st.sampled_from(b"0" * 24 + b"1248"), min_size=15, max_size=15).map(bytes)


@settings(max_examples=1000, deadline=None)
@given(
    mti=st.binary(min_size=4, max_size=4) | st.sampled_from([b"0200", b"0420", b"0800"]),
    primary=_SPARSE,
    secondary_lead=st.sampled_from(b"0123456789ABCDEFabcdef"),
    secondary=_SPARSE,
    tertiary=st.just(b"")
    | st.builds(lambda a, b: bytes([a]) + b, st.sampled_from(b"0123489A"), _SPARSE),
    body=st.binary(max_size=160) | st.text("0123456789", max_size=60).map(str.encode),
)
def test_decode_raw_bytes_with_bitmaps_raises_only_decode_error(
    mti: bytes, primary: bytes, secondary_lead: int, secondary: bytes, tertiary: bytes, body: bytes
) -> None:
    """Raw bytes shaped like a message with a secondary bitmap (bit 65 set half the time,
    sometimes a third bitmap after it) and any body: a message or a DecodeError, never
    another exception."""
    raw = mti + b"8" + primary + bytes([secondary_lead]) + secondary + tertiary + body
    try:
        msg = codec.decode(raw)
    except DecodeError:
        return
    assert msg["t"].isdigit()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in msg.items())
    assert "65" not in msg
