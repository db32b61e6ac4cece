"""Tests for shared.iso.messages, shared.pan and shared.iso.codes: the message-level vocabulary."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acquirer.builder import RequestBuilder
from hsm.keyfile import load_key_file
from shared import crypto
from shared.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from shared.iso import codes
from shared.iso.codes import CODE_TABLE, RC, describe, is_transient
from shared.iso.messages import (
    ECHOED_FIELDS,
    REQUEST_MTIS,
    build_field90,
    changes_state,
    failure_code,
    idempotency_key,
    is_repeat,
    is_response,
    local_time_date,
    make_response,
    match_key,
    original_key,
    parse_field90,
    response_mti,
    transmission_datetime,
)
from shared.pan import PanHasher, account_number_12, luhn_digit, luhn_ok, mask_pan
from tests.support import terminal_builder

KEYS = load_key_file()


def _digits(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet="0123456789", min_size=min_size, max_size=max_size)


PAN = "4761739001010010"
PIN = "1234"


def _builder(start: int = 500) -> RequestBuilder:
    return terminal_builder("PAYLAB01", stan_start=start)


# ---------------------------------------------------------------------------------------------
# MTIs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_mti", "expected"),
    [
        ("0200", "0210"),
        ("0220", "0230"),
        ("0221", "0230"),
        ("0420", "0430"),
        ("0421", "0430"),
        ("0800", "0810"),
    ],
)
def test_response_mti(request_mti: str, expected: str) -> None:
    assert request_mti in REQUEST_MTIS
    assert response_mti(request_mti) == expected
    assert is_response(expected)
    assert not is_response(request_mti)


def test_every_request_mti_has_a_response_mti() -> None:
    for mti in REQUEST_MTIS:
        resp = response_mti(mti)
        assert len(resp) == 4
        assert resp.isdigit()
        assert is_response(resp)
        assert not is_repeat(resp)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "200",
        "02000",
        "02X0",
        "abcd",
        " 200",
        "02.0",
        "0200\n",
        "0210",
        "0290",
        "\uff10\uff12\uff10\uff10",
    ],
)
def test_response_mti_rejects_garbage(garbage: str) -> None:
    with pytest.raises(ValueError):
        response_mti(garbage)


@pytest.mark.parametrize(
    ("mti", "response", "repeat"),
    [
        ("0200", False, False),
        ("0210", True, False),
        ("0220", False, False),
        ("0221", False, True),
        ("0230", True, False),
        ("0420", False, False),
        ("0421", False, True),
        ("0430", True, False),
        ("0800", False, False),
        ("0810", True, False),
        ("", False, False),
        ("021", False, False),
        ("02100", False, False),
    ],
)
def test_is_response_and_is_repeat(mti: str, response: bool, repeat: bool) -> None:
    assert is_response(mti) is response
    assert is_repeat(mti) is repeat


# ---------------------------------------------------------------------------------------------
# make_response
# ---------------------------------------------------------------------------------------------


def test_make_response_echoes_the_listed_fields() -> None:
    payment = _builder().payment("BILL-0001", 125_000, PAN, PIN)
    resp = make_response(payment, "00")
    assert resp["t"] == "0210"
    assert resp["39"] == "00"
    for f in ECHOED_FIELDS:
        if f in payment:
            assert resp[f] == payment[f], f
        else:
            assert f not in resp, f
    assert set(resp) == {"t", "39"} | (set(ECHOED_FIELDS) & set(payment))


def test_make_response_never_copies_pin_block_or_macs() -> None:
    payment = _builder().payment("BILL-0001", 125_000, PAN, PIN)
    assert {"52", "64"} <= set(payment)
    resp = make_response(payment, "00")
    assert not {"52", "64", "128"} & set(resp)
    reversal = _builder().reversal(payment)
    assert "128" in reversal
    resp = make_response(reversal, "00")
    assert resp["t"] == "0430"
    assert resp["90"] == reversal["90"]
    assert not {"52", "64", "128"} & set(resp)


def test_make_response_echoes_network_code() -> None:
    resp = make_response({"t": "0800", "7": "1122060805", "11": "000001", "70": "301"}, "00")
    assert resp == {"t": "0810", "7": "1122060805", "11": "000001", "70": "301", "39": "00"}


def test_make_response_overrides_and_removals() -> None:
    payment = _builder().payment("BILL-0001", 125_000, PAN, PIN)
    resp = make_response(payment, "55", f38="A1B2C3", f4="000000000001", f2="", f62="PLN|JANE")
    assert resp["39"] == "55"
    assert resp["38"] == "A1B2C3"
    assert resp["4"] == "000000000001"
    assert resp["62"] == "PLN|JANE"
    assert "2" not in resp
    assert "f38" not in resp
    # Removing a field the request did not have is harmless.
    assert "90" not in make_response(payment, "00", f90="")


def test_make_response_override_of_39_wins() -> None:
    resp = make_response({"t": "0200", "11": "000001"}, "00", f39="96")
    assert resp["39"] == "96"


def test_make_response_does_not_mutate_the_request() -> None:
    payment = _builder().payment("BILL-0001", 125_000, PAN, PIN)
    before = dict(payment)
    make_response(payment, "05", f2="", f38="X")
    assert payment == before


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def test_match_key_pairs_request_and_response() -> None:
    b = _builder()
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    resp = make_response(payment, "00")
    assert match_key(payment) == match_key(resp) == (payment["11"], "PAYLAB01", "2")
    advice = {**payment, "t": "0220"}
    assert match_key(advice) == match_key(make_response(advice, "00")) == match_key(payment)


def test_match_key_differs_between_classes() -> None:
    base = {"11": "000123", "41": "PAYLAB01"}
    keys = {mti: match_key({**base, "t": mti}) for mti in ("0200", "0420", "0800")}
    assert len(set(keys.values())) == 3
    assert match_key({**base, "t": "0430"}) == keys["0420"]
    assert match_key({**base, "t": "0810"}) == keys["0800"]
    assert match_key({**base, "t": "0421"}) == keys["0420"]


def test_match_key_differs_by_stan_and_terminal() -> None:
    msg = {"t": "0200", "11": "000123", "41": "PAYLAB01"}
    assert match_key(msg) != match_key({**msg, "11": "000124"})
    assert match_key(msg) != match_key({**msg, "41": "PAYLAB02"})


def test_idempotency_key() -> None:
    payment = _builder().payment("BILL-0001", 125_000, PAN, PIN)
    key = idempotency_key(payment)
    assert key == f"008|PAYLAB01|{payment['11']}|{payment['7']}"
    # An advice of the payment, and a resend, are the same transaction.
    assert idempotency_key({**payment, "t": "0220"}) == key
    assert idempotency_key({**payment, "t": "0221"}) == key
    # Any of the four identifying fields changes the identity; other fields do not.
    for f in ("32", "41", "11", "7"):
        assert idempotency_key({**payment, f: payment[f] + "9"}) != key, f
    assert idempotency_key({**payment, "4": "000000000001", "37": "X" * 12}) == key


def test_field90_roundtrip() -> None:
    payment = _builder().payment("BILL-0001", 125_000, PAN, PIN)
    f90 = build_field90(payment)
    assert len(f90) == 42
    assert f90.isdigit()
    assert parse_field90(f90) == {
        "mti": "0200",
        "stan": payment["11"],
        "datetime": payment["7"],
        "acquirer": "8",
    }
    assert f90.endswith("0" * 11)
    assert f90[20:31] == "00000000008"


@settings(max_examples=200, deadline=None)
@given(
    stan=_digits(6, 6),
    dt=_digits(10, 10),
    acquirer=st.integers(min_value=1, max_value=99_999_999_999).map(str),
)
def test_field90_roundtrip_property(stan: str, dt: str, acquirer: str) -> None:
    original = {"t": "0200", "11": stan, "7": dt, "32": acquirer}
    parsed = parse_field90(build_field90(original))
    assert parsed == {"mti": "0200", "stan": stan, "datetime": dt, "acquirer": acquirer}


@pytest.mark.parametrize("bad", ["", "0" * 41, "0" * 43, "0200" + "x" * 38])
def test_parse_field90_rejects_bad_values(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_field90(bad)


def test_original_key_of_a_reversal_equals_the_payment_idempotency_key() -> None:
    b = _builder()
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    reversal = b.reversal(payment)
    assert reversal["11"] != payment["11"]  # the reversal has its own STAN
    assert idempotency_key(reversal) != idempotency_key(payment)
    assert original_key(reversal) == idempotency_key(payment)
    assert original_key({**reversal, "t": "0421"}) == idempotency_key(payment)


def test_original_key_when_the_reversal_comes_from_another_acquirer_id() -> None:
    payment = {"t": "0200", "11": "000321", "7": "1122060805", "32": "008", "41": "PAYLAB01"}
    reversal = {"t": "0420", "32": "77", "41": "PAYLAB01", "90": build_field90(payment)}
    assert original_key(reversal) == "8|PAYLAB01|000321|1122060805"
    assert original_key(reversal, acquirer_width=3) == idempotency_key(payment)


# ---------------------------------------------------------------------------------------------
# Date and time fields
# ---------------------------------------------------------------------------------------------


def test_transmission_datetime_is_utc_mmddhhmmss() -> None:
    moment = datetime(2024, 2, 29, 23, 59, 58, tzinfo=timezone(timedelta(hours=7)))
    assert transmission_datetime(moment.astimezone(UTC)) == "0229165958"
    now = transmission_datetime()
    assert len(now) == 10
    assert now.isdigit()


def test_local_time_date() -> None:
    t12, t13 = local_time_date(datetime(2024, 12, 31, 8, 5, 9))
    assert (t12, t13) == ("080509", "1231")


# ---------------------------------------------------------------------------------------------
# PAN helpers
# ---------------------------------------------------------------------------------------------

GOOD_PANS = [
    "4761739001010010",
    "4111111111111111",
    "5500000000000004",
    "340000000000009",
    "6011000000000004",
    "4222222222222",
    "4761739001010000007",  # 19 digits
    "476173900103",  # 12 digits
]


@pytest.mark.parametrize("pan", GOOD_PANS)
def test_luhn_ok_on_known_good_pans(pan: str) -> None:
    assert luhn_ok(pan)


@pytest.mark.parametrize(
    "pan",
    [
        "4761739001010011",  # wrong check digit
        "4111111111111112",
        "79927398713",  # valid Luhn, but 11 digits
        "1" * 20,
        "",
        "4111-1111-1111-1111",
        "411111111111111a",
        "\uff14" + "\uff11" * 15,  # full-width digits
        " 4111111111111111",
    ],
)
def test_luhn_ok_on_known_bad_pans(pan: str) -> None:
    assert not luhn_ok(pan)


def test_luhn_digit() -> None:
    assert luhn_digit("476173900101001") == "0"
    assert luhn_digit("411111111111111") == "1"
    assert luhn_digit("47617390010") == "3"
    assert luhn_digit("476173900101000000") == "7"


def _reference_luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d // 10 + d % 10
    return total % 10 == 0


@settings(max_examples=200, deadline=None)
@given(pan=_digits(12, 19))
def test_luhn_ok_matches_a_reference(pan: str) -> None:
    assert luhn_ok(pan) is _reference_luhn(pan)


@settings(max_examples=200, deadline=None)
@given(partial=_digits(11, 18))
def test_luhn_digit_property(partial: str) -> None:
    digit = luhn_digit(partial)
    assert luhn_ok(partial + digit)
    others = [d for d in "0123456789" if d != digit]
    assert not any(luhn_ok(partial + d) for d in others)


@pytest.mark.parametrize(
    ("pan", "masked"),
    [
        ("4761739001010010", "476173******0010"),
        ("4222222222222", "422222***2222"),
        ("4111111111111111111", "411111*********1111"),
        ("476173900101", "************"),  # 12 digits: fully masked
        ("1234", "****"),
        ("", ""),
    ],
)
def test_mask_pan(pan: str, masked: str) -> None:
    assert mask_pan(pan) == masked
    assert len(mask_pan(pan)) == len(pan)


@settings(max_examples=200, deadline=None)
@given(pan=_digits(1, 19))
def test_mask_pan_shows_at_most_first6_last4(pan: str) -> None:
    masked = mask_pan(pan)
    assert len(masked) == len(pan)
    visible = [i for i, ch in enumerate(masked) if ch != "*"]
    assert all(masked[i] == pan[i] for i in visible)
    assert all(i < 6 or i >= len(pan) - 4 for i in visible)
    # First 6 + last 4 of a real PAN length; nothing at all of a shorter value.
    assert len(visible) == (10 if len(pan) >= 13 else 0)


@pytest.mark.parametrize(
    ("pan", "account"),
    [
        ("4761739001010010", "173900101001"),
        ("4111111111111111111", "111111111111"),
        ("4222222222222", "422222222222"),
        ("411111111119", "041111111111"),
    ],
)
def test_account_number_12(pan: str, account: str) -> None:
    assert account_number_12(pan) == account


@settings(max_examples=200, deadline=None)
@given(pan=_digits(12, 19))
def test_account_number_12_matches_the_pin_block_account_field(pan: str) -> None:
    assert account_number_12(pan) == crypto.pan_field_12(pan)


def test_pan_hasher_is_deterministic_and_key_dependent() -> None:
    h1 = PanHasher(b"key-one")
    h1_again = PanHasher(b"key-one")
    h2 = PanHasher(b"key-two")
    digest = h1(PAN)
    assert digest == h1(PAN) == h1_again(PAN)
    assert len(digest) == 64
    assert int(digest, 16) >= 0
    assert PAN not in digest
    assert h2(PAN) != digest
    assert h1("4111111111111111") != digest


def test_pan_hasher_is_hmac_sha256_of_the_pan_whatever_came_before() -> None:
    # The keyed state is shared between calls: each call must start from it afresh.
    hasher = PanHasher(b"key-one")
    for pan in (PAN, "4111111111111111", PAN, "5500000000000004"):
        expected = hmac.new(b"key-one", pan.encode("ascii"), hashlib.sha256).hexdigest()
        assert hasher(pan) == expected


# ---------------------------------------------------------------------------------------------
# Response codes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text"),
    [
        ("00", "approved"),
        ("55", "incorrect PIN"),
        ("88", "bill already paid"),
        ("96", "system malfunction"),
    ],
)
def test_describe_known_codes(code: str, text: str) -> None:
    assert describe(code) == text


@pytest.mark.parametrize("code", ["99", "ZZ", "", "000"])
def test_describe_unknown_codes(code: str) -> None:
    assert describe(code) == f"unknown response code {code!r}"


def test_every_code_has_an_entry() -> None:
    assert set(CODE_TABLE) == set(RC)
    for rc in RC:
        assert describe(rc.value) == CODE_TABLE[rc].text
        assert CODE_TABLE[rc].code is rc


def test_is_transient_for_68_91_96_only() -> None:
    transient = {rc.value for rc in RC if is_transient(rc.value)}
    assert transient == {"68", "91", "96"}
    assert not is_transient("99")
    assert not is_transient("")
    assert not is_transient("ZZ")


def test_transient_codes_are_not_final_and_approval_is_final() -> None:
    for rc, info in CODE_TABLE.items():
        if info.transient:
            assert not info.final, rc
    assert CODE_TABLE[codes.RC.APPROVED].final


@pytest.mark.parametrize(
    ("error", "inquiry_code", "payment_code"),
    [
        (UpstreamUnavailable("no link"), "91", "91"),
        (UpstreamUnavailable("dropped after send", sent=True), "91", "68"),
        (UpstreamTimeout("no answer"), "91", "68"),
        (UpstreamError("same key in flight"), "94", "94"),
    ],
    ids=["not-sent", "dropped-after-send", "timeout", "key-in-flight"],
)
def test_failure_code(error: UpstreamError, inquiry_code: str, payment_code: str) -> None:
    b = _builder()
    inquiry = b.inquiry("BILL-0001")
    payment = b.payment("BILL-0001", 125_000, PAN, PIN)
    assert not changes_state(inquiry)
    assert changes_state(payment)
    assert changes_state(b.reversal(payment))
    assert failure_code(error, inquiry) == inquiry_code
    assert failure_code(error, payment) == payment_code
