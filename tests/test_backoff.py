"""Tests for shared.resilience.backoff: the backoff policy, per-operation retry state,
reconnect delays."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.resilience.backoff import Backoff, ReconnectDelay, RetryState


def _never() -> float:
    """A rand that must not be called (jitter is off)."""
    raise AssertionError("rand() called although jitter is off")


# ---------------------------------------------------------------------------------------------
# Backoff
# ---------------------------------------------------------------------------------------------


def test_defaults_match_the_course() -> None:
    policy = Backoff()
    assert (policy.base, policy.factor, policy.cap, policy.max_attempts, policy.jitter) == (
        1.0,
        2.0,
        16.0,
        5,
        False,
    )


def test_delays_are_1_2_4_8_16() -> None:
    policy = Backoff()
    assert [policy.delay(n, _never) for n in range(5)] == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_schedule_has_one_delay_between_each_pair_of_attempts() -> None:
    assert Backoff().schedule() == [1.0, 2.0, 4.0, 8.0]
    assert Backoff(max_attempts=6).schedule() == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert Backoff(max_attempts=1).schedule() == []
    assert Backoff(max_attempts=3, base=0.5, factor=3.0, cap=100.0).schedule() == [0.5, 1.5]


def test_schedule_never_jitters() -> None:
    assert Backoff(jitter=True).schedule() == [1.0, 2.0, 4.0, 8.0]


def test_cap_is_reached_and_held() -> None:
    policy = Backoff(max_attempts=10)
    assert policy.schedule() == [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0, 16.0, 16.0]
    assert policy.delay(100) == 16.0


def test_cap_between_powers_cuts_the_growth() -> None:
    policy = Backoff(base=1.0, factor=2.0, cap=5.0, max_attempts=6)
    assert policy.schedule() == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_huge_retry_number_does_not_overflow() -> None:
    policy = Backoff()
    assert policy.delay(10**6) == 16.0
    assert policy.delay(10**6, _never) == 16.0


def test_factor_one_is_a_constant_delay() -> None:
    policy = Backoff(base=3.0, factor=1.0, cap=3.0, max_attempts=4)
    assert policy.schedule() == [3.0, 3.0, 3.0]
    assert policy.delay(10**6) == 3.0


def test_negative_retry_is_refused() -> None:
    with pytest.raises(ValueError, match="retry"):
        Backoff().delay(-1)


def test_jitter_low_end_is_zero() -> None:
    policy = Backoff(jitter=True)
    assert [policy.delay(n, lambda: 0.0) for n in range(6)] == [0.0] * 6


def test_jitter_high_end_stays_below_the_computed_delay() -> None:
    policy = Backoff(jitter=True)
    for n, computed in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 16.0]):
        d = policy.delay(n, lambda: 0.999999)
        assert d < computed
        assert d == pytest.approx(computed * 0.999999)


def test_jitter_is_uniform_scaling_of_the_computed_delay() -> None:
    policy = Backoff(jitter=True)
    assert policy.delay(2, lambda: 0.5) == 2.0
    assert policy.delay(0, lambda: 0.25) == 0.25


def test_jitter_clamps_a_misbehaving_rand() -> None:
    policy = Backoff(jitter=True)
    assert policy.delay(3, lambda: -0.5) == 0.0
    assert policy.delay(3, lambda: 7.0) == 8.0


@settings(max_examples=300, deadline=None)
@given(
    base=st.floats(min_value=1e-3, max_value=100.0),
    factor=st.floats(min_value=1.0, max_value=10.0),
    extra=st.floats(min_value=0.0, max_value=1000.0),
    retry=st.integers(min_value=0, max_value=5000),
    r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    jitter=st.booleans(),
)
def test_delay_always_within_zero_and_cap(
    base: float, factor: float, extra: float, retry: int, r: float, jitter: bool
) -> None:
    policy = Backoff(base=base, factor=factor, cap=base + extra, jitter=jitter)
    d = policy.delay(retry, lambda: r)
    assert 0.0 <= d <= policy.cap
    if not jitter:
        assert d >= policy.base


@settings(max_examples=100, deadline=None)
@given(
    base=st.floats(min_value=1e-3, max_value=10.0),
    factor=st.floats(min_value=1.0, max_value=4.0),
    extra=st.floats(min_value=0.0, max_value=100.0),
    attempts=st.integers(min_value=1, max_value=30),
)
def test_schedule_is_non_decreasing_and_capped(
    base: float, factor: float, extra: float, attempts: int
) -> None:
    policy = Backoff(base=base, factor=factor, cap=base + extra, max_attempts=attempts)
    sched = policy.schedule()
    assert len(sched) == attempts - 1
    assert all(a <= b for a, b in itertools.pairwise(sched))
    assert all(base <= d <= policy.cap for d in sched)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base": 0.0}, "base"),
        ({"base": -1.0}, "base"),
        ({"base": math.nan}, "base"),
        ({"base": math.inf}, "base"),
        ({"factor": 0.5}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"factor": math.nan}, "factor"),
        ({"factor": math.inf}, "factor"),
        ({"cap": 0.5}, "cap"),
        ({"base": 4.0, "cap": 3.0}, "cap"),
        ({"cap": math.inf}, "cap"),
        ({"cap": math.nan}, "cap"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -3}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
    ],
)
def test_invalid_parameters_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_edge_parameters_are_accepted() -> None:
    Backoff(base=2.0, cap=2.0)  # cap == base
    Backoff(factor=1.0)
    Backoff(max_attempts=1)


def test_backoff_is_frozen() -> None:
    policy = Backoff()
    with pytest.raises(AttributeError):
        policy.base = 3.0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# RetryState
# ---------------------------------------------------------------------------------------------


def test_retry_state_runs_the_whole_schedule_without_deadline() -> None:
    state = RetryState(Backoff(), deadline=None)
    now = 0.0
    delays = []
    while True:
        budget = state.begin(now)
        assert budget == math.inf
        delay = state.next_delay(now, _never)
        if delay is None:
            break
        delays.append(delay)
        now += delay
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert state.attempts == 5
    assert state.begin(now) is None
    assert state.attempts == 5  # a refused begin is not counted


def test_attempts_exhausted() -> None:
    state = RetryState(Backoff(max_attempts=2), deadline=None)
    assert state.begin(0.0) == math.inf
    assert state.next_delay(0.0) == 1.0
    assert state.begin(1.0) == math.inf
    assert state.next_delay(1.0) is None
    assert state.begin(2.0) is None
    assert state.attempts == 2


def test_single_attempt_policy_never_retries() -> None:
    state = RetryState(Backoff(max_attempts=1), deadline=100.0)
    assert state.begin(0.0) == 100.0
    assert state.next_delay(0.0) is None
    assert state.begin(0.0) is None


def test_begin_returns_the_remaining_budget() -> None:
    state = RetryState(Backoff(), deadline=30.0)
    assert state.begin(0.0) == 30.0
    assert state.next_delay(5.0) == 1.0
    assert state.begin(6.0) == 24.0
    assert state.remaining(6.0) == 24.0
    assert state.remaining(31.0) == 0.0  # never negative


def test_begin_refused_at_and_after_the_deadline() -> None:
    state = RetryState(Backoff(), deadline=10.0)
    assert state.begin(10.0) is None
    assert state.begin(11.0) is None
    assert state.attempts == 0
    assert state.begin(9.5) == 0.5
    assert state.attempts == 1


def test_next_delay_none_when_the_delay_would_reach_the_deadline() -> None:
    state = RetryState(Backoff(), deadline=10.0)
    state.begin(0.0)
    # First retry waits 1 s: 8.9 + 1 < 10 leaves time, 9.0 + 1 == 10 does not.
    assert state.next_delay(8.9) == 1.0
    assert state.next_delay(9.0) is None
    assert state.next_delay(9.5) is None


def test_deadline_cuts_the_schedule_short() -> None:
    # Attempts at 0, 1, 3, 7; the fourth retry would wait 8 s, to 15 >= 12: give up.
    state = RetryState(Backoff(), deadline=12.0)
    now = 0.0
    starts = []
    while (budget := state.begin(now)) is not None:
        starts.append(now)
        assert budget == 12.0 - now
        delay = state.next_delay(now, _never)
        if delay is None:
            break
        now += delay
    assert starts == [0.0, 1.0, 3.0, 7.0]
    assert state.attempts == 4


def test_deadline_checked_against_the_jittered_delay() -> None:
    policy = Backoff(jitter=True)
    state = RetryState(policy, deadline=10.0)
    state.begin(0.0)
    state.begin(1.0)
    state.begin(2.0)
    # Retry 2 would wait up to 4 s; at now=7 only a short jittered delay fits.
    assert state.next_delay(7.0, lambda: 0.5) == 2.0
    assert state.next_delay(7.0, lambda: 0.75) is None


def test_next_delay_is_a_query() -> None:
    state = RetryState(Backoff(), deadline=None)
    state.begin(0.0)
    assert state.next_delay(0.0) == state.next_delay(0.0) == 1.0
    assert state.attempts == 1


def test_next_delay_before_any_attempt_is_a_bug() -> None:
    state = RetryState(Backoff(), deadline=None)
    with pytest.raises(RuntimeError):
        state.next_delay(0.0)


def test_remaining_without_deadline_is_infinite() -> None:
    assert RetryState(Backoff(), deadline=None).remaining(1e12) == math.inf


# ---------------------------------------------------------------------------------------------
# ReconnectDelay
# ---------------------------------------------------------------------------------------------


def test_reconnect_grows_to_the_cap_and_stays_there() -> None:
    reconnect = ReconnectDelay(Backoff(max_attempts=1), rand=_never)
    delays = [reconnect.next() for _ in range(9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0, 16.0, 16.0]
    assert reconnect.failures == 9


def test_reconnect_has_no_attempt_limit() -> None:
    reconnect = ReconnectDelay(Backoff(max_attempts=1))
    for _ in range(1000):
        assert reconnect.next() <= 16.0
    assert reconnect.next() == 16.0


def test_reconnect_reset_starts_again_from_base() -> None:
    reconnect = ReconnectDelay(Backoff(base=0.5, cap=4.0))
    assert [reconnect.next() for _ in range(3)] == [0.5, 1.0, 2.0]
    reconnect.reset()
    assert reconnect.failures == 0
    assert [reconnect.next() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_reconnect_jitters_when_the_policy_does() -> None:
    draws = iter([0.5, 0.0, 0.999999])
    reconnect = ReconnectDelay(Backoff(jitter=True), rand=lambda: next(draws))
    assert reconnect.next() == 0.5
    assert reconnect.next() == 0.0
    assert reconnect.next() == pytest.approx(4.0 * 0.999999)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0, exclude_max=True), max_size=60))
def test_reconnect_jittered_delays_stay_within_bounds(draws: list[float]) -> None:
    it = iter(draws)
    reconnect = ReconnectDelay(Backoff(jitter=True), rand=lambda: next(it))
    for n in range(len(draws)):
        assert 0.0 <= reconnect.next() <= min(16.0, 2.0**n)
