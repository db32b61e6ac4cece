"""The chaos proxy's fault policy, without sockets: parsing, validation, per-chunk plans
under a seeded random generator, and bandwidth pacing on a fake clock."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import PaylabError
from shared.lab.chaos.faults import (
    NONE,
    ChunkPlan,
    Faults,
    FaultSpecError,
    Pacer,
    parse_duration,
    parse_probability,
    parse_rate,
    plan,
)

# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300ms", 0.3),
        ("1.5s", 1.5),
        ("0", 0.0),
        ("2m", 120.0),
        (" 10 MS ", 0.01),
        (".5s", 0.5),
        (0.25, 0.25),
        (3, 3.0),
    ],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "-1s", "1h", "1.2.3s", "ms", -0.5, math.inf, True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(FaultSpecError):
        parse_duration(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10kB/s", 10_000),
        ("1MB/s", 1_000_000),
        ("64KiB/s", 65_536),
        ("512B/s", 512),
        ("2048", 2048),
        ("1.5kb", 1500),
        (4096, 4096),
    ],
)
def test_rates(text: str | int, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "0", "10 furlongs/s", "-5kB/s", 0, 0.5, True])
def test_bad_rates(text: object) -> None:
    with pytest.raises(FaultSpecError):
        parse_rate(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "p"), [("30%", 0.3), (0.3, 0.3), ("1", 1.0), (0, 0.0)])
def test_probabilities(text: str | float, p: float) -> None:
    assert parse_probability(text) == pytest.approx(p)


@pytest.mark.parametrize("text", ["150%", -0.1, 1.01, "often", "nan", True])
def test_bad_probabilities(text: object) -> None:
    with pytest.raises(FaultSpecError):
        parse_probability(text)  # type: ignore[arg-type]


# -- the Faults value ----------------------------------------------------------------------


def test_from_dict_accepts_human_strings_and_round_trips() -> None:
    f = Faults.from_dict(
        {
            "latency": "300ms",
            "jitter": "50ms",
            "blackhole": "30%",
            "reset": 0.1,
            "close_after": 1000,
            "bandwidth": "10kB/s",
            "probability": 0.5,
        }
    )
    assert f == Faults(0.3, 0.05, 0.3, 0.1, 1000, 10_000, 0.5)
    assert Faults.from_dict(f.as_dict()) == f
    assert f.active and f.drops


def test_clear_and_merge() -> None:
    assert Faults.clear() is NONE and not NONE.active
    f = NONE.merge({"latency": "1s"}).merge({"bandwidth": "1kB/s"})
    assert f == Faults(latency=1.0, bandwidth=1000)
    assert f.merge({"bandwidth": None}) == Faults(latency=1.0)
    assert f.merge(NONE) == NONE  # a whole Faults replaces


@pytest.mark.parametrize(
    "spec",
    [
        {"latency": "soon"},
        {"blackhole": 2},
        {"reset": -0.1},
        {"close_after": -1},
        {"close_after": 1.5},
        {"bandwidth": 0},
        {"probability": "200%"},
        {"latncy": "1s"},
        {"latency": "601s"},
    ],
)
def test_bad_specs_raise_a_typed_error(spec: dict[str, object]) -> None:
    with pytest.raises(FaultSpecError) as info:
        Faults.from_dict(spec)
    assert isinstance(info.value, PaylabError)


def test_constructor_validates() -> None:
    with pytest.raises(FaultSpecError):
        Faults(latency=-1)
    with pytest.raises(FaultSpecError):
        Faults(blackhole=1.5)
    with pytest.raises(FaultSpecError):
        Faults(bandwidth=0)
    with pytest.raises(FaultSpecError):
        Faults(latency=math.nan)


def test_unknown_key_names_the_known_ones() -> None:
    with pytest.raises(FaultSpecError, match="known: bandwidth, blackhole"):
        NONE.merge({"nope": 1})


# -- per-chunk plans -----------------------------------------------------------------------


def test_no_faults_delivers_everything_at_once() -> None:
    assert plan(NONE, random.Random(1), 0, 100) == ChunkPlan(deliver=100)


def test_probability_one_and_zero_are_exact() -> None:
    rng = random.Random(7)
    for _ in range(200):
        assert plan(Faults(reset=1.0), rng, 0, 10).reset
        assert plan(Faults(blackhole=1.0), rng, 0, 10) == ChunkPlan(drop=True)
        assert plan(Faults(latency=0.2, probability=1.0), rng, 0, 10).delay == 0.2
        assert plan(Faults(latency=0.2, probability=0.0), rng, 0, 10).delay == 0.0
        assert plan(Faults(reset=0.0, blackhole=0.0), rng, 0, 10) == ChunkPlan(deliver=10)


def test_reset_wins_over_drop_and_delivers_nothing() -> None:
    p = plan(Faults(reset=1.0, blackhole=1.0, latency=1.0), random.Random(0), 0, 50)
    assert p.reset and not p.drop and p.deliver == 0


def test_probabilities_in_between_follow_the_seeded_rng() -> None:
    a = [plan(Faults(blackhole=0.3), random.Random(42), 0, 1).drop for _ in range(1)]
    rng1, rng2 = random.Random(42), random.Random(42)
    seq1 = [plan(Faults(blackhole=0.3), rng1, 0, 1).drop for _ in range(1000)]
    seq2 = [plan(Faults(blackhole=0.3), rng2, 0, 1).drop for _ in range(1000)]
    assert seq1 == seq2  # reproducible under a seed
    assert 200 < sum(seq1) < 400  # about 30 %
    assert a == seq1[:1]


def test_jitter_stays_within_bounds_and_never_negative() -> None:
    rng = random.Random(3)
    delays = [plan(Faults(latency=0.1, jitter=0.05), rng, 0, 1).delay for _ in range(500)]
    assert all(0.05 <= d <= 0.15 for d in delays)
    assert max(delays) - min(delays) > 0.05  # it does vary
    wide = [plan(Faults(latency=0.01, jitter=0.1), rng, 0, 1).delay for _ in range(500)]
    assert min(wide) == 0.0 and all(d >= 0 for d in wide)


@pytest.mark.parametrize(
    ("forwarded", "size", "deliver", "close"),
    [
        (0, 999, 999, False),  # one byte short of the mark: keeps going
        (0, 1000, 1000, True),  # exactly at the mark: delivered whole, then closed
        (0, 1500, 1000, True),  # crosses it: cut at the mark
        (999, 10, 1, True),
        (1000, 10, 0, True),  # already there: nothing more
        (2000, 10, 0, True),
    ],
)
def test_close_after_boundaries(forwarded: int, size: int, deliver: int, close: bool) -> None:
    p = plan(Faults(close_after=1000), random.Random(0), forwarded, size)
    assert (p.deliver, p.close) == (deliver, close)


def test_close_after_zero_closes_on_the_first_chunk() -> None:
    assert plan(Faults(close_after=0), random.Random(0), 0, 5) == ChunkPlan(close=True)


# -- bandwidth pacing ----------------------------------------------------------------------


def test_pacer_spreads_chunks_at_the_rate() -> None:
    now = 100.0
    pacer = Pacer(1000, now)
    assert pacer.delay(now, 500) == pytest.approx(0.5)
    assert pacer.delay(now, 500) == pytest.approx(1.0)  # queued behind the first
    now += 1.0
    assert pacer.delay(now, 1000) == pytest.approx(1.0)  # link free again at t+1
    now += 10.0  # idle: no credit is saved up beyond the link being free
    assert pacer.delay(now, 100) == pytest.approx(0.1)


def test_pacer_without_a_rate_never_waits_and_time_going_back_is_harmless() -> None:
    assert Pacer(None, 0.0).delay(0.0, 10**9) == 0.0
    pacer = Pacer(100, 50.0)
    assert pacer.delay(50.0, 100) == pytest.approx(1.0)
    assert pacer.delay(40.0, 100) == pytest.approx(12.0)  # queued from t=51, asked at t=40
    assert pacer.delay(60.0, 0) == 0.0


# -- properties ----------------------------------------------------------------------------

faults_strategy = st.builds(
    Faults,
    latency=st.floats(0, 600),
    jitter=st.floats(0, 600),
    blackhole=st.floats(0, 1),
    reset=st.floats(0, 1),
    close_after=st.none() | st.integers(0, 10**9),
    bandwidth=st.none() | st.integers(1, 10**9),
    probability=st.floats(0, 1),
)


@given(
    faults=faults_strategy,
    seed=st.integers(0, 2**32),
    forwarded=st.integers(0, 10**10),
    size=st.integers(0, 1 << 17),
)
def test_plan_never_raises_and_never_delivers_more_than_the_chunk(
    faults: Faults, seed: int, forwarded: int, size: int
) -> None:
    p = plan(faults, random.Random(seed), forwarded, size)
    assert 0 <= p.deliver <= size
    assert p.delay >= 0 and math.isfinite(p.delay)
    if p.drop or p.reset:
        assert p.deliver == 0
    if faults.close_after is not None and not (p.drop or p.reset):
        assert forwarded + p.deliver <= max(faults.close_after, forwarded)
        assert p.close == (forwarded + size >= faults.close_after)


@given(faults=faults_strategy)
def test_as_dict_round_trips(faults: Faults) -> None:
    assert Faults.from_dict(faults.as_dict()) == faults
