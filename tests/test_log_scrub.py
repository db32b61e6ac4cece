"""Tests for shared.ops.log: JSON log lines never carry a clear PAN or a secret value."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from shared.ops.log import configure_logging, get_logger, scrub_processor

PAN = "4761739001010010"
OTHER_PAN = "4111111111111111111"
MASKED = "476173******0010"
OTHER_MASKED = "411111*********1111"
PIN = "8642"
PIN_BLOCK = "DF24F9EB2BD1D5BE"
KEY = "C1804CC4347CA183F80BCD68860B0BD3"
LONG_DIGITS = re.compile(r"\d{13,}")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """JSON logging into a buffer; the previous configuration is put back afterwards."""
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        yield stream
    finally:
        configure_logging()
        structlog.configure(**saved_structlog)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def _without_timestamp(record: dict[str, Any]) -> str:
    """The record as text minus the timestamp (whose digits could match a short secret)."""
    return json.dumps({k: v for k, v in record.items() if k != "timestamp"})


def test_pan_in_strings_is_masked(log_stream: io.StringIO) -> None:
    log = get_logger("acquirer")
    log.info(f"payment with card {PAN}", note=f"card={PAN};bill=BILL-1", other=OTHER_PAN)
    out = log_stream.getvalue()
    (record,) = _records(log_stream)
    assert record["event"] == f"payment with card {MASKED}"
    assert record["note"] == f"card={MASKED};bill=BILL-1"
    assert record["other"] == OTHER_MASKED
    assert record["service"] == "acquirer"
    assert record["level"] == "info"
    assert PAN not in out
    assert OTHER_PAN not in out
    assert LONG_DIGITS.search(out) is None


def test_pan_in_nested_containers_is_masked(log_stream: io.StringIO) -> None:
    log = get_logger("gateway")
    log.info(
        "forwarded",
        msg={"t": "0200", "2": PAN, "inner": {"card": f"pan {PAN}", "cards": [PAN, (PAN,)]}},
    )
    out = log_stream.getvalue()
    (record,) = _records(log_stream)
    msg = record["msg"]
    assert msg["t"] == "0200"
    assert msg["2"] == MASKED
    assert msg["inner"]["card"] == f"pan {MASKED}"
    assert msg["inner"]["cards"] == [MASKED, [MASKED]]
    assert PAN not in out
    assert LONG_DIGITS.search(out) is None
    assert out.count(MASKED) == 4


def test_secret_keys_are_redacted(log_stream: io.StringIO) -> None:
    log = get_logger("hsm")
    log.info("keys loaded", pin=PIN, pin_block=PIN_BLOCK, key=KEY, pan=PAN)
    out = log_stream.getvalue()
    (record,) = _records(log_stream)
    assert record["pin"] == "[redacted]"
    assert record["pin_block"] == "[redacted]"
    assert record["key"] == "[redacted]"
    assert record["pan"] == MASKED
    assert PIN_BLOCK not in out
    assert KEY not in out
    assert PIN not in _without_timestamp(record)
    assert PAN not in out


def test_secret_keys_inside_nested_dicts_are_redacted(log_stream: io.StringIO) -> None:
    log = get_logger("billing")
    log.info(
        "verify",
        request={"pan": PAN, "pin": PIN, "pin_block": PIN_BLOCK, "hsm": {"key": KEY}},
        batch=[{"pin_block": PIN_BLOCK, "card": PAN}],
    )
    out = log_stream.getvalue()
    (record,) = _records(log_stream)
    request = record["request"]
    assert request["pan"] == MASKED
    assert request["pin"] == "[redacted]"
    assert request["pin_block"] == "[redacted]"
    assert request["hsm"] == {"key": "[redacted]"}
    assert record["batch"] == [{"pin_block": "[redacted]", "card": MASKED}]
    assert PIN_BLOCK not in out
    assert KEY not in out
    assert PIN not in _without_timestamp(record)
    assert PAN not in out
    assert MASKED in out


def test_secret_key_with_a_container_value_is_redacted_whole(log_stream: io.StringIO) -> None:
    get_logger("hsm").info("loaded", key={"TPK": KEY, "note": PAN})
    out = log_stream.getvalue()
    (record,) = _records(log_stream)
    assert record["key"] == "[redacted]"
    assert KEY not in out
    assert PAN not in out


def test_exception_text_is_masked(log_stream: io.StringIO) -> None:
    log = get_logger("gateway")
    try:
        raise ValueError(f"no route for card {PAN}")
    except ValueError:
        log.exception("routing failed")
    out = log_stream.getvalue()
    (record,) = _records(log_stream)
    assert record["level"] == "error"
    assert f"ValueError: no route for card {MASKED}" in record["exception"]
    assert PAN not in out


def test_shorter_digit_runs_are_left_alone(log_stream: io.StringIO) -> None:
    # STAN, RRN and amount are not card numbers: scrubbing must not destroy them.
    get_logger("acquirer").info(
        "sent", stan="000123", rrn="632606615084", amount="000000150000", stan_int=123
    )
    (record,) = _records(log_stream)
    assert record["stan"] == "000123"
    assert record["rrn"] == "632606615084"
    assert record["amount"] == "000000150000"
    assert record["stan_int"] == 123


def test_level_filtering(log_stream: io.StringIO) -> None:
    log = get_logger("acquirer")
    log.debug("hidden", note=PAN)
    log.warning("shown")
    records = _records(log_stream)
    assert [r["event"] for r in records] == ["shown"]
    assert PAN not in log_stream.getvalue()


def test_scrub_processor_directly() -> None:
    event = {"event": f"card {PAN}", "pin": PIN, "data": {"key": KEY, "pan": PAN}, "n": 5}
    out = scrub_processor(None, "info", event)
    assert out == {
        "event": f"card {MASKED}",
        "pin": "[redacted]",
        "data": {"key": "[redacted]", "pan": MASKED},
        "n": 5,
    }


def test_numbers_upper_case_keys_and_dict_keys_are_scrubbed() -> None:
    event = {
        "event": "x",
        "pan_number": int(PAN),
        "PIN": PIN,
        "Key": KEY,
        "by_card": {PAN: 1},
        "cards": {PAN},
        "count": 42,
    }
    out = scrub_processor(None, "info", event)
    assert out["pan_number"] == MASKED
    assert out["PIN"] == "[redacted]"
    assert out["Key"] == "[redacted]"
    assert out["by_card"] == {MASKED: 1}
    assert out["cards"] == [MASKED]
    assert out["count"] == 42
