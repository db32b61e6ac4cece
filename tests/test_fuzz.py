"""Property-based fuzzing of everything that parses bytes from the network.

What the other test modules already cover is not repeated here: random bytes and
single-byte mutations into ``codec.decode`` (test_codec), chunked round trips of the
frame parser (test_framing), random and mutated HSM commands (test_hsm_commands), garbage
over real sockets (test_hostile_input). This module adds:

* the frame parser on arbitrary byte streams in arbitrary chunks, for both header kinds:
  only :class:`FramingError`, frames never above the maximum, buffer bounded;
* multi-step mutations (replace, insert, delete, truncate, duplicate) of valid ISO-8583
  requests through the whole receive pipeline: frame -> ``codec.decode`` ->
  ``validate_request`` (with and without a required MAC) -> re-encode: only
  :class:`DecodeError` / :class:`ValidationError`, and a message that passes validation
  encodes again;
* ``validate_request`` / ``validate_response`` on generated field dicts (any MTI, any
  field numbers, any text values): only :class:`ValidationError`;
* the HSM command processor on each known command code followed by random fields: always
  a well-formed answer, never the internal error 41.

Each property is a plain function of its input (``check_*``) with its strategy beside it,
so ``tests/fuzz_long.py`` runs the same properties with many more examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsm.commands import KNOWN_COMMANDS, process_with_result
from shared.errors import DecodeError, FramingError, ValidationError
from shared.iso import codec
from shared.iso.framing import FrameParser, HeaderKind, encode_frame
from shared.iso.messages import MTI_NETWORK, NMI_ECHO, transmission_datetime
from shared.iso.validation import validate_request, validate_response
from tests.support import DEMO_PAN, DEMO_PIN, KEYS, terminal_builder

MAX_FRAME = 512


# -- frame parser ---------------------------------------------------------------------------
def check_frame_stream(kind: HeaderKind, chunks: list[bytes]) -> None:
    """Any byte stream, cut anywhere: frames within the maximum, or one FramingError."""
    parser = FrameParser(kind, MAX_FRAME)
    for chunk in chunks:
        try:
            frames = parser.frames(chunk)
        except FramingError:
            return  # the stream cannot be resynchronised: the server closes the connection
        for frame in frames:
            assert isinstance(frame, bytes)
            assert len(frame) <= MAX_FRAME
        # at most one partial frame (header + body) plus the chunk just fed is kept
        assert parser.buffered <= kind.size + MAX_FRAME + len(chunk)


frame_streams = st.tuples(
    st.sampled_from(list(HeaderKind)), st.lists(st.binary(max_size=700), max_size=8)
)


# -- ISO-8583 receive pipeline -----------------------------------------------------------
def _valid_requests() -> list[bytes]:
    builder = terminal_builder("FUZZTERM", stan_start=1)
    payment = builder.payment("PLN-1015", 250000, DEMO_PAN, DEMO_PIN)
    echo = {"t": MTI_NETWORK, "7": transmission_datetime(), "11": "999999", "70": NMI_ECHO}
    return [
        codec.encode(payment),
        codec.encode(builder.inquiry("PLN-1016")),
        codec.encode(builder.reversal(payment)),
        codec.encode(echo),
    ]


VALID_REQUESTS = _valid_requests()


@st.composite
def mutated(draw: st.DrawFn, valid: list[bytes] = VALID_REQUESTS) -> bytes:
    data = bytearray(draw(st.sampled_from(valid)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "duplicate"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if op == "replace" and data:
            data[pos] = draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(min_value=1, max_value=8))]
        elif op == "duplicate" and data:
            data[pos:pos] = data[pos : pos + draw(st.integers(min_value=1, max_value=16))]
        else:
            del data[pos:]
    return bytes(data)


def check_iso_pipeline(payload: bytes) -> None:
    """What a listener does with one frame: only the documented errors, and what passes
    validation is a message the codec can encode again."""
    parser = FrameParser(HeaderKind.BINARY2, 65535)
    assert parser.frames(encode_frame(payload, HeaderKind.BINARY2, 65535)) == [payload]
    try:
        msg = codec.decode(payload)
    except DecodeError:
        return
    assert isinstance(msg.get("t"), str) and len(msg["t"]) == 4
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in msg.items())
    codec.redact(msg)  # what a log line does with it
    for require_mac in (False, True):
        try:
            validate_request(msg, require_mac=require_mac)
        except ValidationError:
            continue
        # a valid request can be answered: encoded again, and the MAC rule applies
        assert codec.decode(codec.encode(msg)) == msg
        codec.mac_input_of_received(payload, msg)


iso_payloads = st.one_of(mutated(), st.binary(max_size=400))


# -- validator on generated dicts -------------------------------------------------------------
_field_keys = st.one_of(
    st.sampled_from(["t", "2", "3", "4", "7", "11", "12", "32", "37", "39", "41", "52", "70"]),
    st.integers(min_value=1, max_value=128).map(str),
    st.text(max_size=4),
)
generated_messages = st.dictionaries(
    _field_keys,
    st.one_of(st.text(max_size=30), st.from_regex(r"\A\d{0,20}\Z"), st.just("")),
    max_size=12,
)
any_mti = st.sampled_from(["0200", "0210", "0220", "0221", "0400", "0401", "0420", "0800", "9999"])


def check_validator(msg: dict[str, str]) -> None:
    for fn in (
        lambda m: validate_request(m, require_mac=False),
        lambda m: validate_request(m, require_mac=True),
        validate_response,
    ):
        try:
            fn(msg)
        except ValidationError as exc:
            assert str(exc)


def _validator_with_mti(args: tuple[dict[str, str], str]) -> None:
    msg, mti = args
    check_validator({**msg, "t": mti})  # a supported MTI: the field rules are reached
    check_validator(msg)  # any "t" at all, or none


# -- HSM command processor ----------------------------------------------------------------
hsm_requests = st.tuples(
    st.binary(min_size=4, max_size=4),
    st.sampled_from(sorted(KNOWN_COMMANDS)),
    st.one_of(
        st.binary(max_size=200),
        st.text(alphabet="0123456789ABCDEFU", max_size=200).map(str.encode),
    ),
).map(lambda t: t[0] + t[1].encode() + t[2])


def check_hsm(request: bytes) -> None:
    result = process_with_result(request, KEYS)
    response = result.response
    assert isinstance(response, bytes)
    assert response[:4] == request[:4]
    assert response[6:8].isdigit()
    assert result.error == response[6:8].decode()
    assert result.error != "41", "an internal error: the processor raised"
    assert result.command in KNOWN_COMMANDS


#: Every property with its strategy: ``tests/fuzz_long.py`` runs them with more examples.
TARGETS: dict[str, tuple[Callable[..., None], Any]] = {
    "frame_stream": (lambda args: check_frame_stream(*args), frame_streams),
    "iso_pipeline": (check_iso_pipeline, iso_payloads),
    "validator": (lambda args: _validator_with_mti(args), st.tuples(generated_messages, any_mti)),
    "hsm": (check_hsm, hsm_requests),
}

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(frame_streams)
def test_frame_parser_any_stream(args: tuple[HeaderKind, list[bytes]]) -> None:
    check_frame_stream(*args)


@FUZZ
@given(iso_payloads)
def test_iso_pipeline_on_mutated_and_random_payloads(payload: bytes) -> None:
    check_iso_pipeline(payload)


def test_mutations_of_valid_requests_reach_the_validator() -> None:
    """The valid seeds pass the whole pipeline (so mutations start from real messages)."""
    for payload in VALID_REQUESTS:
        validate_request(codec.decode(payload))
        check_iso_pipeline(payload)


@FUZZ
@given(st.tuples(generated_messages, any_mti))
def test_validator_on_generated_messages(args: tuple[dict[str, str], str]) -> None:
    _validator_with_mti(args)


@FUZZ
@given(hsm_requests)
def test_hsm_known_commands_with_random_fields(request: bytes) -> None:
    check_hsm(request)


def test_long_fuzz_runner_runs_briefly() -> None:
    """``tests/fuzz_long.py`` works (a short run; the long one is run by hand)."""
    import time

    from tests import fuzz_long

    started = time.monotonic()
    counts = fuzz_long.run(examples=30, seed=1)
    assert set(counts) == set(TARGETS)
    assert time.monotonic() - started < 20


def test_long_fuzz_runner_over_the_listeners_runs_briefly() -> None:
    """``python -m tests.fuzz_long --listeners N`` works (a short run over real sockets;
    the 100 000-frame one is run by hand): no handler failed, every connection still
    answers an echo."""
    from tests import fuzz_long

    figures = fuzz_long.run_listeners(frames=800, seed=5)
    assert set(figures) == set(fuzz_long.LISTENERS)
    for name, f in figures.items():
        assert f.sent == 200, name
        assert f.handler_failed == 0 and f.tracebacks_logged == 0, name
        assert f.echoes_answered == fuzz_long.CONNECTIONS, name
    iso = [f for name, f in figures.items() if name != "hsm"]
    assert all(f.counters["rejected_undecodable"] > 0 for f in iso)
    # Logged once per connection (and interval), however many frames were undecodable.
    assert all(0 < f.undecodable_logged <= fuzz_long.CONNECTIONS for f in iso)
