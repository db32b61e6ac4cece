"""Tests for shared.iso.framing: length-prefixed frames over arbitrary chunking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import FramingError
from shared.iso.framing import DEFAULT_MAX_FRAME, FrameParser, HeaderKind, encode_frame

KINDS = [HeaderKind.BINARY2, HeaderKind.ASCII4]


def _header(kind: HeaderKind, length: int) -> bytes:
    """A length header built independently of encode_frame (to bypass its size check)."""
    if kind is HeaderKind.BINARY2:
        return length.to_bytes(2, "big")
    return str(length).zfill(4).encode("ascii")


# ---------------------------------------------------------------------------------------------
# encode_frame
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "payload", "expected"),
    [
        (HeaderKind.BINARY2, b"abc", b"\x00\x03abc"),
        (HeaderKind.BINARY2, b"", b"\x00\x00"),
        (HeaderKind.BINARY2, b"x" * 300, b"\x01\x2c" + b"x" * 300),
        (HeaderKind.ASCII4, b"abc", b"0003abc"),
        (HeaderKind.ASCII4, b"", b"0000"),
        (HeaderKind.ASCII4, b"x" * 1234, b"1234" + b"x" * 1234),
    ],
)
def test_encode_frame_header(kind: HeaderKind, payload: bytes, expected: bytes) -> None:
    assert encode_frame(payload, kind) == expected


def test_header_kind_sizes_and_limits() -> None:
    assert HeaderKind.BINARY2.size == 2
    assert HeaderKind.ASCII4.size == 4
    assert HeaderKind.BINARY2.limit == 0xFFFF
    assert HeaderKind.ASCII4.limit == 9999
    assert HeaderKind("binary2") is HeaderKind.BINARY2
    assert HeaderKind("ascii4") is HeaderKind.ASCII4


@pytest.mark.parametrize("kind", KINDS)
def test_encode_frame_accepts_exactly_max_frame(kind: HeaderKind) -> None:
    wire = encode_frame(b"z" * 50, kind, max_frame=50)
    assert wire == _header(kind, 50) + b"z" * 50


@pytest.mark.parametrize("kind", KINDS)
def test_encode_frame_refuses_oversize(kind: HeaderKind) -> None:
    with pytest.raises(FramingError):
        encode_frame(b"z" * 51, kind, max_frame=50)
    with pytest.raises(FramingError):
        encode_frame(b"z" * (DEFAULT_MAX_FRAME + 1), kind)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_frame_refuses_more_than_the_header_can_express(kind: HeaderKind) -> None:
    # Even with a generous max_frame, the header itself caps the length.
    with pytest.raises(FramingError):
        encode_frame(b"z" * (kind.limit + 1), kind, max_frame=kind.limit + 10)
    assert len(encode_frame(b"z" * kind.limit, kind, max_frame=kind.limit + 10)) == (
        kind.size + kind.limit
    )


# ---------------------------------------------------------------------------------------------
# FrameParser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_frame_fed_byte_by_byte(kind: HeaderKind) -> None:
    payload = b"0200 hello frame"
    wire = encode_frame(payload, kind)
    parser = FrameParser(kind)
    for i, byte in enumerate(wire[:-1]):
        parser.feed(bytes([byte]))
        assert parser.next_frame() is None
        assert parser.buffered == i + 1
    parser.feed(wire[-1:])
    assert parser.next_frame() == payload
    assert parser.next_frame() is None
    assert parser.buffered == 0


@pytest.mark.parametrize("kind", KINDS)
def test_several_frames_in_one_chunk(kind: HeaderKind) -> None:
    payloads = [b"first", b"", b"third frame", b"x" * 500]
    parser = FrameParser(kind)
    parser.feed(b"".join(encode_frame(p, kind) for p in payloads))
    got = []
    while (frame := parser.next_frame()) is not None:
        got.append(frame)
    assert got == payloads
    assert parser.buffered == 0


@pytest.mark.parametrize("kind", KINDS)
def test_several_frames_and_a_partial_one(kind: HeaderKind) -> None:
    wire = encode_frame(b"one", kind) + encode_frame(b"two", kind)
    tail = encode_frame(b"three", kind)
    parser = FrameParser(kind)
    assert parser.frames(wire + tail[:3]) == [b"one", b"two"]
    assert parser.buffered == 3
    assert parser.frames(tail[3:]) == [b"three"]
    assert parser.buffered == 0


@pytest.mark.parametrize("kind", KINDS)
def test_frame_split_at_every_offset(kind: HeaderKind) -> None:
    payload = bytes(range(40))
    wire = encode_frame(payload, kind) + encode_frame(b"next", kind)
    first_len = kind.size + len(payload)
    for cut in range(len(wire) + 1):
        parser = FrameParser(kind)
        head = parser.frames(wire[:cut])
        if cut < first_len:
            assert head == []
        elif cut < len(wire):
            assert head == [payload]
        else:
            assert head == [payload, b"next"]
        assert parser.buffered == cut - sum(kind.size + len(p) for p in head)
        rest = parser.frames(wire[cut:])
        assert head + rest == [payload, b"next"], cut
        assert parser.buffered == 0


@pytest.mark.parametrize("kind", KINDS)
def test_zero_length_frames_are_returned_as_empty_bytes(kind: HeaderKind) -> None:
    parser = FrameParser(kind)
    wire = encode_frame(b"", kind) + encode_frame(b"", kind) + encode_frame(b"a", kind)
    assert parser.frames(wire) == [b"", b"", b"a"]
    # A lone keep-alive is a frame too, not "need more bytes".
    parser.feed(_header(kind, 0))
    assert parser.next_frame() == b""
    assert parser.next_frame() is None


@pytest.mark.parametrize("kind", KINDS)
def test_partial_header_needs_more_bytes(kind: HeaderKind) -> None:
    parser = FrameParser(kind)
    assert parser.next_frame() is None
    parser.feed(_header(kind, 5)[:-1])
    assert parser.next_frame() is None
    assert parser.buffered == kind.size - 1


@pytest.mark.parametrize("kind", KINDS)
def test_exactly_max_frame_is_accepted(kind: HeaderKind) -> None:
    parser = FrameParser(kind, max_frame=100)
    payload = bytes(range(100))
    assert parser.frames(encode_frame(payload, kind, max_frame=100)) == [payload]


@pytest.mark.parametrize("kind", KINDS)
def test_oversize_rejected_as_soon_as_header_is_complete(kind: HeaderKind) -> None:
    parser = FrameParser(kind, max_frame=100)
    header = _header(kind, 101)
    parser.feed(header[:-1])
    assert parser.next_frame() is None  # header not complete yet: no verdict
    parser.feed(header[-1:])
    # No body byte has arrived: the length alone is enough to refuse the frame.
    with pytest.raises(FramingError):
        parser.next_frame()


@pytest.mark.parametrize("kind", KINDS)
def test_oversize_rejected_with_default_max(kind: HeaderKind) -> None:
    parser = FrameParser(kind)
    parser.feed(_header(kind, DEFAULT_MAX_FRAME + 1))
    with pytest.raises(FramingError):
        parser.next_frame()


def test_binary2_max_header_value_rejected_under_default_max() -> None:
    parser = FrameParser(HeaderKind.BINARY2)
    with pytest.raises(FramingError):
        parser.frames(b"\xff\xff")


@pytest.mark.parametrize(
    "header", [b"12a4", b"  12", b"-123", b"+123", b"0x10", b"\x00\x00\x00\x05"]
)
def test_ascii4_non_decimal_header_raises(header: bytes) -> None:
    parser = FrameParser(HeaderKind.ASCII4)
    parser.feed(header + b"12345")
    with pytest.raises(FramingError):
        parser.next_frame()


def test_same_bytes_mean_different_lengths_per_header_kind() -> None:
    # "0005" is five bytes as ascii4, but 0x3030 = 12336 as binary2 (over the default max).
    wire = b"0005hello"
    assert FrameParser(HeaderKind.ASCII4).frames(wire) == [b"hello"]
    with pytest.raises(FramingError):
        FrameParser(HeaderKind.BINARY2).frames(wire)


@pytest.mark.parametrize("kind", KINDS)
def test_buffered_reports_partial_frame(kind: HeaderKind) -> None:
    parser = FrameParser(kind)
    assert parser.buffered == 0
    wire = encode_frame(b"abcdefgh", kind)
    parser.feed(wire[:-2])
    assert parser.next_frame() is None
    assert parser.buffered == len(wire) - 2
    parser.feed(wire[-2:] + wire[:1])
    assert parser.next_frame() == b"abcdefgh"
    assert parser.buffered == 1


@pytest.mark.parametrize("kind", KINDS)
def test_frames_without_data_drains_what_is_buffered(kind: HeaderKind) -> None:
    parser = FrameParser(kind)
    parser.feed(encode_frame(b"a", kind) + encode_frame(b"b", kind))
    assert parser.frames() == [b"a", b"b"]
    assert parser.frames() == []


# ---------------------------------------------------------------------------------------------
# Property: any payloads, any chunking
# ---------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    payloads=st.lists(st.binary(max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=15),
)
def test_roundtrip_any_chunking(kind: HeaderKind, payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(p, kind) for p in payloads)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    parser = FrameParser(kind)
    got: list[bytes] = []
    for start, end in itertools.pairwise(points):
        got.extend(parser.frames(wire[start:end]))
        # Everything received is either returned or still buffered, never lost.
        assert sum(kind.size + len(p) for p in got) + parser.buffered == end
    assert got == payloads
    assert parser.buffered == 0
