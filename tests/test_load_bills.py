"""Which bills the locust terminals pay: the demo bills, or generated ones (PAYLAB_LOAD_BILLS)."""

from __future__ import annotations

import random

import pytest

from billing.demo_data import DEMO_CARD, GENERATED_BILL_AMOUNT, generated_bill_number
from loadtests.isoclient import OPEN_BILLS, bill_picker, parse_bills


@pytest.mark.parametrize("spec", [None, ""])
def test_no_spec_means_the_demo_bills(spec: str | None) -> None:
    assert parse_bills(spec) is None
    pick = bill_picker(spec, random.Random(7))
    open_numbers = {b.bill_number: b for b in OPEN_BILLS}
    for _ in range(50):
        bill = pick()
        demo = open_numbers[bill.bill_number]
        assert bill.amount_due == demo.amount_due
        assert bill.card.name == demo.customer


def test_generated_bills_are_picked_within_the_range() -> None:
    assert parse_bills("LOAD:20") == ("LOAD", 20)
    pick = bill_picker("LOAD:20", random.Random(7))
    seen = {pick().bill_number for _ in range(400)}
    assert seen == {generated_bill_number("LOAD", i) for i in range(20)}
    bill = pick()
    assert (bill.amount_due, bill.card) == (GENERATED_BILL_AMOUNT, DEMO_CARD)
    assert DEMO_CARD.pan not in repr(bill)  # a PAN never ends up in a log line by accident


@pytest.mark.parametrize("spec", ["LOAD", "LOAD:", ":10", "LOAD:x", "LOAD:0", "LOAD:-3"])
def test_malformed_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="PAYLAB_LOAD_BILLS"):
        parse_bills(spec)


def test_generated_numbers() -> None:
    assert generated_bill_number("LOAD", 42) == "LOAD-0000042"
