"""codec.encode_keeping and the record of requests encoded by encode_upstream: the message
kept with the bytes is exactly what decoding those bytes gives, so the record is unchanged."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given

from shared.errors import DecodeError
from shared.iso import codec
from shared.server.record import MessageRecord
from shared.server.service import _encoded, _RecordedPool, encode_upstream
from tests.support import terminal_builder
from tests.test_codec_fast import odd_dicts, valid_messages


def _decoded(payload: bytes) -> list[tuple[str, str]] | None:
    try:
        return list(codec.decode(payload).items())
    except DecodeError:
        return None


@given(msg=valid_messages())
def test_the_kept_message_is_what_decoding_gives(msg: dict[str, str]) -> None:
    payload, kept = codec.encode_keeping(msg)
    assert payload == codec.encode(msg)
    assert kept is not None
    assert list(kept.items()) == _decoded(payload)  # the same fields, in the same order


@given(msg=odd_dicts())
def test_odd_messages_encode_the_same_and_keep_only_what_decoding_gives(
    msg: dict[Any, Any],
) -> None:
    try:
        expected = codec.encode(msg)
    except Exception as exc:
        try:
            codec.encode_keeping(msg)
        except type(exc):
            return
        raise AssertionError("encode_keeping accepted what encode refused") from None
    payload, kept = codec.encode_keeping(msg)
    assert payload == expected
    if kept is not None:
        assert list(kept.items()) == _decoded(payload)


def test_a_non_digit_mti_keeps_nothing() -> None:
    msg = dict(terminal_builder().payment("BILL00000001", 100, "4111111111111111", "1234"))
    msg["t"] = "02A0"
    payload, kept = codec.encode_keeping(msg)
    assert kept is None
    assert payload == codec.encode(msg)


def _pool(record: MessageRecord) -> _RecordedPool[Any]:
    # Only what _record_sent uses: the record, the ISO flag and the link's name.
    pool: _RecordedPool[Any] = object.__new__(_RecordedPool)
    pool._record = record
    pool._iso = True
    pool.name = "billing"
    return pool


def _entries(record: MessageRecord) -> list[dict[str, Any]]:
    # Everything but the sequence number, which differs between two records.
    return [{**dataclasses.asdict(e), "seq": 0} for e in record]


def test_the_record_of_an_upstream_request_is_the_same_whether_kept_or_decoded() -> None:
    msg = dict(terminal_builder().payment("BILL00000001", 12345, "4111111111111111", "1234"))
    msg["43"] = "SHOP 4111111111111111".ljust(40)  # a PAN-like run the record scrubs
    msg["p"] = "ignored"
    kept_record, decoded_record = MessageRecord("gateway", 10), MessageRecord("gateway", 10)

    payload = encode_upstream(msg)
    assert payload == codec.encode(msg)
    kept = _encoded.get()
    assert kept is not None and kept[0] is payload  # the record takes the kept message
    _pool(kept_record)._record_sent(payload, 1.0, 2.0, "no answer in time")
    # A payload that was not encoded by encode_upstream (an equal copy) is decoded.
    _pool(decoded_record)._record_sent(bytes(bytearray(payload)), 1.0, 2.0, "no answer in time")
    assert _entries(kept_record) == _entries(decoded_record)
    assert len(kept_record) == 1


def test_an_undecodable_payload_is_still_recorded_as_such() -> None:
    record = MessageRecord("gateway", 10)
    encode_upstream(dict(terminal_builder().payment("BILL00000001", 1, "4111111111111111", "1234")))
    _pool(record)._record_sent(b"not iso", 1.0, 2.0, "")
    (entry,) = list(record)
    assert "undecodable" in entry.note
