"""Tests for shared.iso.validation: per-MTI request rules and the response check."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hsm.keyfile import load_key_file
from shared.errors import ValidationError
from shared.iso import codec
from shared.iso.messages import Message
from shared.iso.validation import FIELD_RULES, MANDATORY, validate_request, validate_response
from tests.support import terminal_builder

KEYS = load_key_file()
PAN = "4761739001010010"
PIN = "1234"

BUILDER = terminal_builder("PAYLAB01", stan_start=100)

PAYMENT = BUILDER.payment("BILL-0001", 125_000, PAN, PIN)
INQUIRY = BUILDER.inquiry("BILL-0001")
REVERSAL = BUILDER.reversal(PAYMENT)


def _advice(mti: str = "0220") -> Message:
    msg = {k: v for k, v in PAYMENT.items() if k not in ("52", "64")}
    msg["t"] = mti
    return BUILDER.sign(msg)


ADVICE = _advice()
NETWORK = {"t": "0800", "7": PAYMENT["7"], "11": "000777", "70": "001"}

VALID: dict[str, Message] = {
    "0200": PAYMENT,
    "0220": ADVICE,
    "0221": _advice("0221"),
    "0420": REVERSAL,
    "0421": {**REVERSAL, "t": "0421"},
    "0800": NETWORK,
}


def _raises(msg: Message, field: str, *, require_mac: bool = False) -> None:
    with pytest.raises(ValidationError) as err:
        validate_request(msg, require_mac=require_mac)
    assert err.value.field == field, str(err.value)


# ---------------------------------------------------------------------------------------------
# Valid messages
# ---------------------------------------------------------------------------------------------


def test_builder_payment_is_valid_with_mac_required() -> None:
    validate_request(PAYMENT, require_mac=True)
    # ...and it stays valid after a trip over the wire.
    validate_request(codec.decode(codec.encode(PAYMENT)), require_mac=True)


@pytest.mark.parametrize("mti", sorted(VALID))
def test_valid_request_of_each_mti(mti: str) -> None:
    validate_request(VALID[mti], require_mac=mti != "0800")


def test_inquiry_without_pan_is_valid() -> None:
    assert "2" not in INQUIRY
    assert "52" not in INQUIRY
    validate_request(INQUIRY, require_mac=True)


def test_inquiry_with_pan_is_valid() -> None:
    validate_request(BUILDER.inquiry("BILL-0002", pan=PAN), require_mac=True)


def test_network_message_needs_no_mac() -> None:
    validate_request(NETWORK, require_mac=True)


def test_mac_not_required_by_default() -> None:
    validate_request({k: v for k, v in PAYMENT.items() if k != "64"})


def test_reversal_mac_in_field_128_satisfies_require_mac() -> None:
    assert "128" in REVERSAL
    validate_request(REVERSAL, require_mac=True)


# ---------------------------------------------------------------------------------------------
# Mandatory fields
# ---------------------------------------------------------------------------------------------

MANDATORY_CASES = [(mti, f) for mti in ("0200", "0220", "0420", "0800") for f in MANDATORY[mti]]


@pytest.mark.parametrize(("mti", "field"), MANDATORY_CASES)
def test_missing_mandatory_field(mti: str, field: str) -> None:
    msg = {k: v for k, v in VALID[mti].items() if k != field}
    _raises(msg, field)


def test_mandatory_table_covers_every_request_mti() -> None:
    assert set(MANDATORY) == {"0200", "0220", "0221", "0420", "0421", "0800"}
    assert "2" in MANDATORY["0220"]
    assert "90" in MANDATORY["0420"]
    assert set(MANDATORY["0800"]) == {"7", "11", "70"}


# ---------------------------------------------------------------------------------------------
# One case per rule
# ---------------------------------------------------------------------------------------------


def _set(base: Message, **fields: str) -> Callable[[], Message]:
    def make() -> Message:
        msg = dict(base)
        for k, v in fields.items():
            key = k.removeprefix("f")
            if v == "":
                msg.pop(key, None)
            else:
                msg[key] = v
        return msg

    return make


RULE_CASES: list[tuple[str, Callable[[], Message], str, bool]] = [
    # (case, message factory, expected field, require_mac)
    ("non-numeric amount", _set(PAYMENT, f4="00000012500A"), "4", False),
    ("short amount", _set(PAYMENT, f4="12500"), "4", False),
    ("bad Luhn PAN", _set(PAYMENT, f2="4761739001010011"), "2", False),
    ("short PAN", _set(PAYMENT, f2="47617390010"), "2", False),
    ("STAN 000000", _set(PAYMENT, f11="000000"), "11", False),
    ("non-numeric STAN", _set(PAYMENT, f11="00001A"), "11", False),
    ("date-time month 13", _set(PAYMENT, f7="1315120000"), "7", False),
    ("date-time month 00", _set(PAYMENT, f7="0015120000"), "7", False),
    ("date-time day 32", _set(PAYMENT, f7="0132120000"), "7", False),
    ("date-time hour 24", _set(PAYMENT, f7="0115240000"), "7", False),
    ("date-time minute 60", _set(PAYMENT, f7="0115236000"), "7", False),
    ("date-time second 60", _set(PAYMENT, f7="0115235960"), "7", False),
    ("unknown processing code", _set(PAYMENT, f3="000000"), "3", False),
    ("unknown NMI code", _set(NETWORK, f70="999"), "70", False),
    ("bad bill number", _set(PAYMENT, f48="BILL 0001"), "48", False),
    ("bill number starting with '-'", _set(PAYMENT, f48="-BILL"), "48", False),
    ("short terminal id", _set(PAYMENT, f41="PAYLAB1"), "41", False),
    ("bad currency", _set(PAYMENT, f49="IDR"), "49", False),
    ("PIN block not hex", _set(PAYMENT, f52="G" * 16), "52", False),
    ("MAC not hex", _set(PAYMENT, f64="Z" * 16), "64", False),
    ("MAC 128 not hex", _set(REVERSAL, f128="xyz"), "128", False),
    ("field 90 not 42 digits", _set(REVERSAL, f90="1" * 41), "90", False),
    ("acquirer id too long", _set(PAYMENT, f32="1" * 12), "32", False),
    ("payment without PIN block", _set(PAYMENT, f52=""), "52", False),
    ("payment without PAN", _set(PAYMENT, f2=""), "2", False),
    ("PIN block without PAN", _set(INQUIRY, f52=PAYMENT["52"]), "2", False),
    ("advice with a PIN block", _set(ADVICE, f52=PAYMENT["52"]), "52", False),
    ("reversal with a PIN block", _set(REVERSAL, f2=PAN, f52=PAYMENT["52"]), "52", False),
    ("advice of an inquiry", _set(ADVICE, f3="310000", f4="000000000000"), "3", False),
    ("inquiry with a non-zero amount", _set(INQUIRY, f4="000000000001"), "4", False),
    ("payment with zero amount", _set(PAYMENT, f4="000000000000"), "4", False),
    ("MAC required but absent", _set(PAYMENT, f64=""), "64", True),
    ("reversal MAC required but absent", _set(REVERSAL, f128=""), "64", True),
    ("unsupported MTI 0100", _set(PAYMENT, t="0100"), "t", False),
    ("unsupported MTI 0210", _set(PAYMENT, t="0210"), "t", False),
    ("non-numeric MTI", _set(PAYMENT, t="02X0"), "t", False),
    ("no MTI", _set(PAYMENT, t=""), "t", False),
]


@pytest.mark.parametrize(
    ("make", "field", "require_mac"),
    [pytest.param(make, field, mac, id=case) for case, make, field, mac in RULE_CASES],
)
def test_rule_violation(make: Callable[[], Message], field: str, require_mac: bool) -> None:
    _raises(make(), field, require_mac=require_mac)


def test_every_field_rule_has_a_description() -> None:
    for field, (check, text) in FIELD_RULES.items():
        assert callable(check), field
        assert text, field


def test_validation_error_names_the_first_bad_field_of_the_mandatory_list() -> None:
    # Two mandatory fields missing: the first in table order is reported.
    msg = {k: v for k, v in PAYMENT.items() if k not in ("3", "49")}
    _raises(msg, "3")


def test_validation_does_not_mutate_the_message() -> None:
    msg = dict(PAYMENT)
    validate_request(msg, require_mac=True)
    assert msg == PAYMENT


# ---------------------------------------------------------------------------------------------
# validate_response
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["00", "05", "55", "91", "A1"])
def test_validate_response_accepts_two_char_code(code: str) -> None:
    validate_response({"t": "0210", "11": PAYMENT["11"], "39": code})


@pytest.mark.parametrize(
    "resp",
    [
        {"t": "0210", "11": "000001"},
        {"t": "0210", "39": "0"},
        {"t": "0210", "39": "000"},
        {"t": "0210", "39": ""},
        {"t": "0210", "39": "0 "},
    ],
)
def test_validate_response_rejects_missing_or_bad_code(resp: Message) -> None:
    with pytest.raises(ValidationError) as err:
        validate_response(resp)
    assert err.value.field == "39"
