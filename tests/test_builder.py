"""Tests for acquirer.builder: STANs, RRNs, PIN blocks and MACs of the acquirer's requests."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from acquirer.builder import RequestBuilder, StanCounter, make_rrn
from hsm.keyfile import load_key_file
from shared.crypto import CryptoError, decrypt_pin_block, mac_alg3
from shared.iso import codec
from shared.iso.messages import build_field90, make_response
from shared.iso.validation import validate_request
from tests.support import make_terminal

KEYS = load_key_file()
TPK = KEYS.keys["TPK"].clear
TAK = KEYS.keys["TAK"].clear
PAN = "4761739001010010"
PIN = "1234"


def _builder(start: int | None = 1000, tak: bytes = TAK) -> RequestBuilder:
    stans = None if start is None else StanCounter(start=start)
    return RequestBuilder(make_terminal("PAYLAB01", tak), stans)


# ---------------------------------------------------------------------------------------------
# STAN and RRN
# ---------------------------------------------------------------------------------------------


def test_stans_are_six_digits_and_consecutive() -> None:
    b = _builder(start=41)
    stans = [b.inquiry("BILL-1")["11"] for _ in range(5)]
    assert stans == ["000042", "000043", "000044", "000045", "000046"]


def test_random_start_gives_valid_stans() -> None:
    for _ in range(50):
        stan = StanCounter().next()
        assert len(stan) == 6
        assert stan.isdigit()
        assert 1 <= int(stan) <= 999_999


def test_stan_wraps_from_999999_to_000001() -> None:
    b = _builder(start=999_997)
    stans = [b.payment("BILL-1", 100, PAN, PIN)["11"] for _ in range(4)]
    assert stans == ["999998", "999999", "000001", "000002"]
    assert "000000" not in stans


def test_stan_counter_starting_at_zero() -> None:
    counter = StanCounter(start=0)
    assert counter.next() == "000001"


def test_stans_unique_across_the_wrap() -> None:
    counter = StanCounter(start=990_000)
    stans = [counter.next() for _ in range(20_000)]
    assert len(set(stans)) == len(stans)
    assert "000000" not in stans
    assert all(len(s) == 6 and s.isdigit() for s in stans)
    wrap = stans.index("999999")
    assert stans[wrap + 1] == "000001"
    assert stans[-1] == "010001"


def test_stans_unique_across_builder_messages() -> None:
    b = _builder(start=999_900)
    msgs = [b.inquiry("BILL-1") for _ in range(150)]
    stans = [m["11"] for m in msgs]
    assert len(set(stans)) == len(stans)
    assert all(len(s) == 6 and s.isdigit() and s != "000000" for s in stans)


def test_rrn_is_12_digits_ending_with_the_stan() -> None:
    b = _builder(start=None)
    for msg in (b.inquiry("BILL-1"), b.payment("BILL-1", 5, PAN, PIN)):
        rrn = msg["37"]
        assert len(rrn) == 12
        assert rrn.isdigit()
        assert rrn.endswith(msg["11"])


def test_make_rrn_layout() -> None:
    # Year digit, day of year (2024 is a leap year: 31 Dec is day 366), hour, STAN.
    assert make_rrn("000123", datetime(2024, 12, 31, 23, 5, tzinfo=UTC)) == "436623000123"
    assert make_rrn("999999", datetime(2030, 1, 1, 0, 0, tzinfo=UTC)) == "000100999999"


# ---------------------------------------------------------------------------------------------
# Message content
# ---------------------------------------------------------------------------------------------


def test_messages_carry_the_terminal_identity() -> None:
    b = _builder()
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    assert payment["t"] == "0200"
    assert payment["3"] == "500000"
    assert payment["4"] == "000000125000"
    assert payment["32"] == "008"
    assert payment["41"] == "PAYLAB01"
    assert payment["42"] == "PAYLAB-MERCH-01"
    assert payment["48"] == "BILL-0001"
    assert payment["49"] == "360"
    assert payment["2"] == PAN
    inquiry = b.inquiry("BILL-0001")
    assert inquiry["3"] == "310000"
    assert inquiry["4"] == "000000000000"
    assert "2" not in inquiry
    assert "52" not in inquiry
    assert b.inquiry("BILL-0001", pan=PAN)["2"] == PAN


def test_builder_messages_are_valid_requests() -> None:
    b = _builder()
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    for msg in (b.inquiry("BILL-0001"), payment, b.reversal(payment)):
        validate_request(msg, require_mac=True)
        validate_request(codec.decode(codec.encode(msg)), require_mac=True)


def test_reversal_refers_to_the_original() -> None:
    b = _builder()
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    reversal = b.reversal(payment)
    assert reversal["t"] == "0420"
    assert reversal["90"] == build_field90(payment)
    assert reversal["4"] == payment["4"]
    assert reversal["48"] == payment["48"]
    assert reversal["11"] != payment["11"]
    assert "52" not in reversal
    assert "2" not in reversal
    assert "128" in reversal
    assert "64" not in reversal


# ---------------------------------------------------------------------------------------------
# PIN block
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pin", ["1234", "0000", "987654", "123456789012"])
def test_pin_block_decrypts_to_the_pin_under_the_tpk(pin: str) -> None:
    payment = _builder().payment("BILL-1", 100, PAN, pin)
    block = payment["52"]
    assert len(block) == 16
    assert block == block.upper()
    assert pin not in block
    assert decrypt_pin_block(block, PAN, TPK) == pin


def test_pin_block_does_not_decrypt_to_the_pin_under_another_key() -> None:
    block = _builder().payment("BILL-1", 100, PAN, PIN)["52"]
    other = KEYS.keys["ZPK"].clear
    try:
        recovered = decrypt_pin_block(block, PAN, other)
    except CryptoError:
        return
    assert recovered != PIN


def test_pin_block_is_bound_to_the_pan() -> None:
    block = _builder().payment("BILL-1", 100, PAN, PIN)["52"]
    other_pan = "4111111111111111"
    try:
        recovered = decrypt_pin_block(block, other_pan, TPK)
    except CryptoError:
        return
    assert recovered != PIN


# ---------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------


def test_request_mac_is_the_retail_mac_of_the_covered_bytes() -> None:
    b = _builder()
    for msg in (b.payment("BILL-1", 100, PAN, PIN), b.inquiry("BILL-1")):
        raw = codec.encode(msg)
        assert msg["64"] == mac_alg3(TAK, raw[:-16]).hex().upper()
    reversal = b.reversal(b.payment("BILL-1", 100, PAN, PIN))
    raw = codec.encode(reversal)
    assert reversal["128"] == mac_alg3(TAK, raw[:-16]).hex().upper()


def _signed_response(b: RequestBuilder, code: str = "00") -> tuple[bytes, dict[str, str]]:
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    resp = b.sign(make_response(payment, code, f38="A1B2C3", f62="PLN|JANE DOE"))
    raw = codec.encode(resp)
    return raw, codec.decode(raw)


def test_response_mac_ok_for_a_response_signed_with_the_same_tak() -> None:
    b = _builder()
    raw, msg = _signed_response(b)
    assert msg["t"] == "0210"
    assert "64" in msg
    assert b.response_mac_ok(raw, msg)
    # Another builder holding the same TAK agrees.
    assert _builder(start=5).response_mac_ok(raw, msg)


def test_response_mac_ok_for_a_reversal_response_with_mac_in_128() -> None:
    b = _builder()
    reversal = b.reversal(b.payment("BILL-0001", 125_000, PAN, PIN))
    resp = b.sign(make_response(reversal, "00"))
    assert "128" in resp
    raw = codec.encode(resp)
    assert b.response_mac_ok(raw, codec.decode(raw))


def test_response_mac_fails_after_flipping_any_covered_byte() -> None:
    b = _builder()
    raw, msg = _signed_response(b)
    covered = len(raw) - 16
    for i in range(covered):
        tampered = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]
        assert not b.response_mac_ok(tampered, msg), i


def test_response_mac_fails_after_changing_the_mac() -> None:
    b = _builder()
    raw, msg = _signed_response(b)
    mac = msg["64"]
    wrong = ("0" if mac[0] != "0" else "1") + mac[1:]
    assert not b.response_mac_ok(raw[:-16] + wrong.encode(), {**msg, "64": wrong})


def test_response_mac_fails_with_another_key() -> None:
    raw, msg = _signed_response(_builder())
    assert not _builder(tak=KEYS.keys["ZPK"].clear).response_mac_ok(raw, msg)
    raw, msg = _signed_response(_builder(tak=KEYS.keys["PVK"].clear))
    assert not _builder().response_mac_ok(raw, msg)


def test_response_without_a_mac_is_rejected() -> None:
    b = _builder()
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    resp = make_response(payment, "00")
    raw = codec.encode(resp)
    assert not b.response_mac_ok(raw, codec.decode(raw))


def test_response_mac_accepts_lower_case_hex() -> None:
    b = _builder()
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    resp = make_response(payment, "00")
    field, covered = codec.encode_for_mac(resp)
    resp[field] = mac_alg3(TAK, covered).hex().lower()
    raw = codec.encode(resp)
    assert raw[:-16] == covered
    assert b.response_mac_ok(raw, codec.decode(raw))


def test_sign_is_deterministic_and_replaces_an_old_mac() -> None:
    b = _builder()
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    mac = payment["64"]
    resigned = b.sign({**payment, "64": "0" * 16})
    assert resigned["64"] == mac
