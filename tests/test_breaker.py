"""Tests for shared.resilience.breaker: the circuit-breaker state machine, driven by a fake
clock."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shared.resilience.breaker import (
    BreakerConfig,
    BreakerSnapshot,
    BreakerState,
    CircuitBreaker,
    Permit,
    Transition,
)

S = BreakerState


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class Harness:
    """A breaker, its clock and the transitions it reported."""

    def __init__(self, **config: object) -> None:
        self.clock = FakeClock()
        self.transitions: list[Transition] = []
        self.config = BreakerConfig(**config)  # type: ignore[arg-type]
        self.breaker = CircuitBreaker("billing", self.config, self.clock, self.transitions.append)

    def calls(self, *outcomes: bool) -> None:
        """Make one call per outcome (True: success), each with a fresh permit."""
        for ok in outcomes:
            permit = self.breaker.acquire()
            assert permit is not None
            self.breaker.record(permit, success=ok)

    def open(self) -> None:
        """Drive a CLOSED breaker to OPEN by failures (however many it still takes)."""
        assert self.breaker.state is S.CLOSED
        for _ in range(self.config.window_size + self.config.consecutive_failures):
            if self.breaker.state is S.OPEN:
                return
            self.calls(False)
        raise AssertionError("the breaker did not open")

    def half_open(self) -> None:
        self.open()
        self.clock.advance(self.config.open_wait)
        assert self.breaker.state is S.HALF_OPEN

    def to_state(self, target: BreakerState) -> None:
        """Drive a fresh breaker to ``target`` by the ordinary route."""
        if target is S.OPEN:
            self.open()
        elif target is S.HALF_OPEN:
            self.half_open()
        elif target is S.FORCED_OPEN:
            self.breaker.force_open()
        elif target is S.DISABLED:
            self.breaker.disable()
        assert self.breaker.state is target

    def last(self) -> Transition:
        return self.transitions[-1]


def _rate_only(**extra: object) -> Harness:
    """Window 10, minimum 4, threshold 0.5, the consecutive rule off."""
    cfg: dict[str, object] = {
        "window_size": 10,
        "minimum_calls": 4,
        "failure_rate_threshold": 0.5,
        "consecutive_failures": 0,
    }
    cfg.update(extra)
    return Harness(**cfg)


# ---------------------------------------------------------------------------------------------
# BreakerConfig
# ---------------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    cfg = BreakerConfig()
    assert cfg.window_size == 20
    assert cfg.minimum_calls == 10
    assert cfg.failure_rate_threshold == 0.5
    assert cfg.consecutive_failures == 5
    assert cfg.slow_call_threshold is None
    assert cfg.open_wait == 30.0
    assert cfg.half_open_calls == 1
    assert (cfg.probe_delay, cfg.probe_max_delay) == (0.5, 16.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window_size": 0}, "window_size"),
        ({"minimum_calls": 0}, "minimum_calls"),
        ({"window_size": 5, "minimum_calls": 6}, "minimum_calls"),
        ({"failure_rate_threshold": 0.0}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 1.01}, "failure_rate_threshold"),
        ({"failure_rate_threshold": math.nan}, "failure_rate_threshold"),
        ({"consecutive_failures": -1}, "consecutive_failures"),
        ({"slow_call_threshold": 0.0}, "slow_call_threshold"),
        ({"slow_call_threshold": -1.0}, "slow_call_threshold"),
        ({"slow_call_threshold": math.nan}, "slow_call_threshold"),
        ({"open_wait": -1.0}, "open_wait"),
        ({"open_wait": math.inf}, "open_wait"),
        ({"probe_delay": 0.0}, "probe_delay"),
        ({"probe_delay": 2.0, "probe_max_delay": 1.0}, "probe_delay"),
        ({"probe_max_delay": math.inf}, "probe_delay"),
        ({"open_wait": math.nan}, "open_wait"),
        ({"half_open_calls": 0}, "half_open_calls"),
    ],
)
def test_config_invalid(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]


def test_config_edges_accepted() -> None:
    BreakerConfig(window_size=1, minimum_calls=1)
    BreakerConfig(failure_rate_threshold=1.0, consecutive_failures=0, open_wait=0.0)
    BreakerConfig(slow_call_threshold=0.001)


# ---------------------------------------------------------------------------------------------
# CLOSED
# ---------------------------------------------------------------------------------------------


def test_starts_closed_and_passes_calls() -> None:
    h = Harness()
    assert h.breaker.state is S.CLOSED
    permit = h.breaker.acquire()
    assert permit == Permit(generation=0, trial=False)
    assert h.breaker.generation == 0
    assert h.transitions == []


def test_opens_on_consecutive_failures() -> None:
    h = Harness()  # 5 consecutive
    h.calls(False, False, False, False)
    assert h.breaker.state is S.CLOSED
    h.calls(False)
    assert h.breaker.state is S.OPEN
    assert h.transitions == [Transition(S.CLOSED, S.OPEN, 1000.0, "5 consecutive failures")]


def test_a_success_resets_the_consecutive_count() -> None:
    h = Harness()
    h.calls(False, False, False, False, True, False, False, False, False)
    assert h.breaker.state is S.CLOSED
    assert h.breaker.snapshot().consecutive_failures == 4
    h.calls(False)
    assert h.breaker.state is S.OPEN


def test_business_decline_recorded_as_success_resets_consecutive() -> None:
    # A decline (05, 51) is the upstream answering: the caller records success=True.
    h = Harness(consecutive_failures=2, minimum_calls=10)
    h.calls(False, True, False, True, False)
    assert h.breaker.state is S.CLOSED


def test_consecutive_rule_disabled_by_zero() -> None:
    h = _rate_only(minimum_calls=10)
    h.calls(*[False] * 9)
    assert h.breaker.state is S.CLOSED  # 9 failures in a row, but below minimum_calls
    h.calls(False)
    assert h.breaker.state is S.OPEN
    assert h.last().reason == "failure rate 100% over 10 calls"


def test_opens_by_failure_rate() -> None:
    h = Harness(consecutive_failures=0)  # window 20, minimum 10, threshold 0.5
    h.calls(*[True, False] * 4)  # 8 calls, 4 failures
    h.calls(True, True, True, True, True, True)  # 14 calls, 4 failures: 29%
    assert h.breaker.state is S.CLOSED
    h.calls(*[False] * 5)  # 19 calls, 9 failures: 47%
    assert h.breaker.state is S.CLOSED
    h.calls(False)  # 20 calls, 10 failures: 50%
    assert h.breaker.state is S.OPEN
    assert h.last().reason == "failure rate 50% over 20 calls"


def test_reason_string_for_rate() -> None:
    h = Harness(consecutive_failures=0, minimum_calls=20, failure_rate_threshold=0.6)
    h.calls(*[True] * 8)
    h.calls(*[False] * 11)
    assert h.breaker.state is S.CLOSED  # 19 calls: below minimum_calls
    h.calls(False)  # 12 of 20 failed
    assert h.breaker.state is S.OPEN
    assert h.last().reason == "failure rate 60% over 20 calls"


def test_threshold_reached_exactly_opens() -> None:
    h = _rate_only()  # minimum 4, threshold 0.5
    h.calls(True, True, False)
    assert h.breaker.state is S.CLOSED
    h.calls(False)  # 2 of 4 = 0.5 exactly
    assert h.breaker.state is S.OPEN
    assert h.last().reason == "failure rate 50% over 4 calls"


def test_just_below_threshold_stays_closed() -> None:
    h = _rate_only(window_size=10, minimum_calls=10, failure_rate_threshold=0.3)
    h.calls(*[True] * 8, False, False)  # 2 of 10 = 0.2
    assert h.breaker.state is S.CLOSED
    h.calls(False)  # slides: drops a success: 3 of 10 = 0.3 exactly
    assert h.breaker.state is S.OPEN


def test_below_minimum_calls_never_opens_by_rate() -> None:
    h = _rate_only()  # minimum 4
    h.calls(False, False, False)  # 100% but only 3 calls
    assert h.breaker.state is S.CLOSED
    snap = h.breaker.snapshot()
    assert snap.failure_rate is None
    assert snap.calls_in_window == 3
    assert snap.failures_in_window == 3


def test_window_slides_and_old_failures_drop_out() -> None:
    h = _rate_only(window_size=4, minimum_calls=4, failure_rate_threshold=0.75)
    h.calls(False, False, True, True)  # 50%
    assert h.breaker.state is S.CLOSED
    h.calls(True, True)  # the two failures slid out
    snap = h.breaker.snapshot()
    assert (snap.calls_in_window, snap.failures_in_window, snap.failure_rate) == (4, 0, 0.0)
    h.calls(False, False)  # 2 of 4
    assert h.breaker.state is S.CLOSED
    h.calls(False)  # 3 of 4 = 0.75
    assert h.breaker.state is S.OPEN


def test_a_success_reaching_minimum_calls_can_open_by_rate() -> None:
    # The failures already in the window reach the threshold; the call that makes the
    # window big enough to judge happens to be a success.
    h = _rate_only(window_size=10, minimum_calls=4, failure_rate_threshold=0.5)
    h.calls(False, False, True)
    assert h.breaker.state is S.CLOSED
    h.calls(True)  # 2 of 4 = 50%
    assert h.breaker.state is S.OPEN
    assert h.last().reason == "failure rate 50% over 4 calls"


def test_a_success_below_threshold_stays_closed() -> None:
    h = _rate_only(window_size=4, minimum_calls=4, failure_rate_threshold=0.5)
    h.calls(False, True, True, True)  # 25%
    h.calls(True, True)
    assert h.breaker.state is S.CLOSED


def test_slow_success_counts_as_a_failure() -> None:
    h = Harness(slow_call_threshold=2.0, consecutive_failures=2)
    permit = h.breaker.acquire()
    assert permit is not None
    h.breaker.record(permit, success=True, duration=2.0)  # exactly the threshold: not slow
    assert h.breaker.snapshot().consecutive_failures == 0
    for _ in range(2):
        permit = h.breaker.acquire()
        assert permit is not None
        h.breaker.record(permit, success=True, duration=2.5)
    assert h.breaker.state is S.OPEN
    snap = h.breaker.snapshot()
    assert snap.slow_calls == 2
    assert snap.total_failures == 2
    assert h.last().reason == "2 consecutive failures"


def test_slow_failure_counted_once() -> None:
    h = Harness(slow_call_threshold=1.0)
    permit = h.breaker.acquire()
    assert permit is not None
    h.breaker.record(permit, success=False, duration=9.0)
    snap = h.breaker.snapshot()
    assert (snap.total_failures, snap.slow_calls) == (1, 0)


def test_no_slow_threshold_means_duration_ignored() -> None:
    h = Harness(consecutive_failures=1)
    permit = h.breaker.acquire()
    assert permit is not None
    h.breaker.record(permit, success=True, duration=1e6)
    assert h.breaker.state is S.CLOSED


# ---------------------------------------------------------------------------------------------
# OPEN and HALF_OPEN
# ---------------------------------------------------------------------------------------------


def test_open_rejects_and_counts() -> None:
    h = Harness()
    h.open()
    assert h.breaker.acquire() is None
    assert h.breaker.acquire() is None
    assert h.breaker.rejected == 2
    assert h.breaker.snapshot().rejected == 2


def test_open_to_half_open_at_exactly_open_wait_and_not_before() -> None:
    h = Harness(open_wait=30.0)
    h.open()
    opened = h.clock.now
    h.clock.advance(29.999)
    assert h.breaker.state is S.OPEN
    assert h.breaker.open_remaining() == pytest.approx(0.001)
    h.clock.now = opened + 30.0
    assert h.breaker.state is S.HALF_OPEN
    assert h.last() == Transition(S.OPEN, S.HALF_OPEN, opened + 30.0, "wait elapsed")
    assert len(h.transitions) == 2


def test_wait_elapsed_transition_emitted_once() -> None:
    h = Harness()
    h.open()
    h.clock.advance(100.0)
    for _ in range(3):
        assert h.breaker.state is S.HALF_OPEN
    assert [t.to_state for t in h.transitions] == [S.OPEN, S.HALF_OPEN]


def test_acquire_itself_moves_open_to_half_open() -> None:
    h = Harness()
    h.open()
    h.clock.advance(30.0)
    permit = h.breaker.acquire()
    assert permit is not None
    assert (permit.generation, permit.trial) == (2, True)
    assert h.last().to_state is S.HALF_OPEN


def test_zero_open_wait_goes_half_open_on_the_next_look() -> None:
    h = Harness(open_wait=0.0)
    h.calls(*[False] * 5)
    assert h.transitions[0].to_state is S.OPEN
    assert h.breaker.state is S.HALF_OPEN


def test_half_open_lets_only_half_open_calls_through() -> None:
    h = Harness(half_open_calls=2)
    h.half_open()
    p1, p2 = h.breaker.acquire(), h.breaker.acquire()
    assert p1 is not None and p1.trial
    assert p2 is not None and p2.trial
    assert h.breaker.acquire() is None
    assert h.breaker.rejected == 1


def test_half_open_closes_after_all_trials_succeed() -> None:
    h = Harness(half_open_calls=3)
    h.half_open()
    permits = [h.breaker.acquire() for _ in range(3)]
    assert all(p is not None for p in permits)
    for p in permits[:2]:
        assert p is not None
        h.breaker.record(p, success=True)
        assert h.breaker.state is S.HALF_OPEN
    # Succeeded trials keep their slots: no new trial while 3 are used.
    assert h.breaker.acquire() is None
    assert permits[2] is not None
    h.breaker.record(permits[2], success=True)
    assert h.breaker.state is S.CLOSED
    assert h.last().from_state is S.HALF_OPEN
    assert h.last().reason == "3 trial calls succeeded"
    snap = h.breaker.snapshot()
    assert (snap.calls_in_window, snap.failures_in_window, snap.consecutive_failures) == (0, 0, 0)


def test_single_trial_reason_is_singular() -> None:
    h = Harness()
    h.half_open()
    h.calls(True)
    assert h.last() == Transition(S.HALF_OPEN, S.CLOSED, h.clock.now, "1 trial call succeeded")


def test_half_open_trial_failure_reopens_with_a_new_open_period() -> None:
    h = Harness(half_open_calls=2, open_wait=10.0)
    h.half_open()
    p = h.breaker.acquire()
    assert p is not None
    h.clock.advance(3.0)
    h.breaker.record(p, success=False)
    assert h.breaker.state is S.OPEN
    assert h.last() == Transition(S.HALF_OPEN, S.OPEN, h.clock.now, "trial call failed")
    assert h.breaker.snapshot().opened_at == h.clock.now
    assert h.breaker.open_remaining() == 10.0
    h.clock.advance(9.0)
    assert h.breaker.state is S.OPEN
    h.clock.advance(1.0)
    assert h.breaker.state is S.HALF_OPEN


def test_half_open_slow_trial_reopens() -> None:
    h = Harness(slow_call_threshold=1.0)
    h.half_open()
    p = h.breaker.acquire()
    assert p is not None
    h.breaker.record(p, success=True, duration=1.5)
    assert h.breaker.state is S.OPEN
    assert h.last().reason == "trial call slow"


def test_new_half_open_period_has_fresh_trial_slots() -> None:
    h = Harness(half_open_calls=2)
    h.half_open()
    p1 = h.breaker.acquire()
    assert p1 is not None
    h.breaker.record(p1, success=True)  # one success of two
    p2 = h.breaker.acquire()
    assert p2 is not None
    h.breaker.record(p2, success=False)  # reopen
    h.clock.advance(30.0)
    assert h.breaker.state is S.HALF_OPEN
    assert h.breaker.acquire() is not None
    assert h.breaker.acquire() is not None
    assert h.breaker.acquire() is None


def test_release_frees_a_trial_slot() -> None:
    h = Harness()
    h.half_open()
    p = h.breaker.acquire()
    assert p is not None
    assert h.breaker.acquire() is None
    h.breaker.release(p)
    assert h.breaker.state is S.HALF_OPEN  # nothing recorded
    assert h.breaker.snapshot().total_calls == 5  # only the five that opened it
    p2 = h.breaker.acquire()
    assert p2 is not None and p2.trial
    h.breaker.record(p2, success=True)
    assert h.breaker.state is S.CLOSED


def test_trial_permits_are_told_apart() -> None:
    h = Harness(half_open_calls=2)
    h.half_open()
    p1, p2 = h.breaker.acquire(), h.breaker.acquire()
    assert p1 is not None and p2 is not None
    assert p1 != p2
    assert (p1.generation, p1.trial) == (p2.generation, p2.trial)


def test_release_twice_frees_only_one_slot() -> None:
    h = Harness(half_open_calls=2)
    h.half_open()
    p1, p2 = h.breaker.acquire(), h.breaker.acquire()
    assert p1 is not None and p2 is not None
    h.breaker.release(p1)
    h.breaker.release(p1)
    h.breaker.release(p1)
    assert h.breaker.acquire() is not None
    assert h.breaker.acquire() is None  # p2 still holds its slot


def test_release_after_record_frees_nothing() -> None:
    h = Harness(half_open_calls=2)
    h.half_open()
    p1, p2 = h.breaker.acquire(), h.breaker.acquire()
    assert p1 is not None and p2 is not None
    h.breaker.record(p1, success=True)
    h.breaker.release(p1)
    assert h.breaker.acquire() is None  # p1 succeeded (keeps its slot), p2 outstanding


def test_release_of_closed_or_stale_permits_records_nothing() -> None:
    h = Harness()
    p = h.breaker.acquire()
    assert p is not None
    h.breaker.release(p)
    h.open()
    h.breaker.release(p)
    snap = h.breaker.snapshot()
    assert snap.total_calls == 5
    assert snap.stale == 0
    assert h.breaker.state is S.OPEN


def test_double_record_of_a_trial_cannot_close_early() -> None:
    h = Harness(half_open_calls=2)
    h.half_open()
    p = h.breaker.acquire()
    assert p is not None
    h.breaker.record(p, success=True)
    h.breaker.record(p, success=True)  # a caller bug: the slot was already settled
    assert h.breaker.state is S.HALF_OPEN
    assert h.breaker.stale == 1


def test_record_after_release_is_ignored() -> None:
    h = Harness()
    h.half_open()
    p = h.breaker.acquire()
    assert p is not None
    h.breaker.release(p)
    h.breaker.record(p, success=False)
    assert h.breaker.state is S.HALF_OPEN
    assert h.breaker.stale == 1


# ---------------------------------------------------------------------------------------------
# Stale permits
# ---------------------------------------------------------------------------------------------


def test_outcome_after_opening_is_stale_and_ignored() -> None:
    h = Harness()
    slow = h.breaker.acquire()
    assert slow is not None
    h.open()
    h.breaker.record(slow, success=False)
    assert h.breaker.stale == 1
    assert h.breaker.snapshot().total_calls == 5
    assert len(h.transitions) == 1


def test_closed_permit_finishing_in_half_open_does_not_count_as_trial() -> None:
    h = Harness()
    old = h.breaker.acquire()
    assert old is not None
    h.half_open()
    h.breaker.record(old, success=True)  # must not close the breaker
    assert h.breaker.state is S.HALF_OPEN
    h.breaker.record(old, success=False)  # must not reopen it either
    assert h.breaker.state is S.HALF_OPEN
    assert h.breaker.stale == 2


def test_trial_permit_finishing_after_reset_is_stale() -> None:
    h = Harness()
    h.half_open()
    trial = h.breaker.acquire()
    assert trial is not None
    h.breaker.reset()
    h.breaker.record(trial, success=False)
    assert h.breaker.state is S.CLOSED
    assert h.breaker.stale == 1
    assert h.breaker.snapshot().calls_in_window == 0


def test_trial_permit_of_an_earlier_half_open_period_is_stale() -> None:
    h = Harness(half_open_calls=2)
    h.half_open()
    t1, t2 = h.breaker.acquire(), h.breaker.acquire()
    assert t1 is not None and t2 is not None
    h.breaker.record(t1, success=False)  # reopen
    h.clock.advance(30.0)
    assert h.breaker.state is S.HALF_OPEN
    h.breaker.record(t2, success=True)
    assert h.breaker.state is S.HALF_OPEN
    assert h.breaker.stale == 1


def test_forged_permit_of_current_generation_in_wrong_state_is_ignored() -> None:
    h = Harness()
    h.open()
    h.breaker.record(Permit(h.breaker.generation, trial=False), success=True)
    h.breaker.record(Permit(h.breaker.generation, trial=True), success=True)
    assert h.breaker.state is S.OPEN
    assert h.breaker.stale == 2
    h.clock.advance(30.0)
    assert h.breaker.state is S.HALF_OPEN
    h.breaker.record(Permit(h.breaker.generation, trial=True, serial=99), success=True)
    assert h.breaker.state is S.HALF_OPEN  # a serial never handed out holds no slot
    assert h.breaker.stale == 3


# ---------------------------------------------------------------------------------------------
# record_event
# ---------------------------------------------------------------------------------------------


def test_record_event_in_closed_counts_like_a_call() -> None:
    h = Harness()
    for _ in range(5):
        h.breaker.record_event(success=False)
    assert h.breaker.state is S.OPEN
    assert h.last().reason == "5 consecutive failures"


def test_record_event_success_resets_consecutive() -> None:
    h = Harness()
    h.calls(False, False, False, False)
    h.breaker.record_event(success=True)
    assert h.breaker.snapshot().consecutive_failures == 0


def test_record_event_in_half_open() -> None:
    h = Harness(half_open_calls=2)
    h.half_open()
    h.breaker.record_event(success=True)
    assert h.breaker.state is S.HALF_OPEN
    # The event took a trial slot's worth of success: one more trial allowed.
    p = h.breaker.acquire()
    assert p is not None
    assert h.breaker.acquire() is None
    h.breaker.record(p, success=True)
    assert h.breaker.state is S.CLOSED

    h2 = Harness()
    h2.half_open()
    h2.breaker.record_event(success=False)
    assert h2.breaker.state is S.OPEN
    assert h2.last().reason == "trial call failed"

    h3 = Harness()
    h3.half_open()
    h3.breaker.record_event(success=True)
    assert h3.breaker.state is S.CLOSED


def test_record_event_after_wait_elapsed_is_a_trial() -> None:
    h = Harness()
    h.open()
    h.clock.advance(30.0)
    h.breaker.record_event(success=True)  # evaluates the state first: HALF_OPEN, then closes
    assert [t.to_state for t in h.transitions] == [S.OPEN, S.HALF_OPEN, S.CLOSED]


@pytest.mark.parametrize("success", [True, False])
def test_record_event_ignored_when_forced_open(success: bool) -> None:
    h = Harness()
    h.to_state(S.FORCED_OPEN)
    before = h.breaker.snapshot()
    h.breaker.record_event(success=success)
    assert h.breaker.snapshot() == before
    assert h.breaker.probe_wait() is None  # an operator decided: no probing


# ---------------------------------------------------------------------------------------------
# Probing while OPEN
# ---------------------------------------------------------------------------------------------


def test_a_successful_probe_moves_open_to_half_open_at_once() -> None:
    h = Harness(open_wait=30.0, probe_delay=0.5)
    h.open()
    assert h.breaker.probe_wait() == 0.5  # the first probe may go after probe_delay
    h.clock.advance(0.5)
    assert h.breaker.probe_wait() == 0.0
    h.breaker.record_event(success=True)  # a connect + sign-on, or an echo, answered
    assert h.breaker.state is S.HALF_OPEN
    assert h.transitions[-1].reason == "probe succeeded"
    assert h.breaker.probe_wait() is None
    h.calls(True)  # the trial call
    assert h.breaker.state is S.CLOSED
    assert h.clock.now - h.transitions[0].at == 0.5  # not the 30 s of open_wait


def test_failed_probes_double_the_wait_up_to_the_cap() -> None:
    h = Harness(open_wait=1000.0, probe_delay=0.5, probe_max_delay=4.0)
    h.open()
    waits = []
    for _ in range(6):
        wait = h.breaker.probe_wait()
        assert wait is not None
        waits.append(wait)
        h.clock.advance(wait)
        h.breaker.record_event(success=False)  # connection refused, sign-on unanswered
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert h.breaker.state is S.OPEN
    snap = h.breaker.snapshot()
    assert snap.probes_failed == 6 and snap.probe_in == 4.0
    assert [t.to_state for t in h.transitions] == [S.OPEN]  # failed probes change no state


def test_open_wait_still_ends_an_open_period_without_a_successful_probe() -> None:
    h = Harness(open_wait=3.0, probe_delay=0.5)
    h.open()
    h.clock.advance(3.0)
    assert h.breaker.state is S.HALF_OPEN
    assert h.transitions[-1].reason == "wait elapsed"


def test_reopening_before_a_call_succeeds_waits_longer_for_its_first_probe() -> None:
    h = Harness(open_wait=1000.0, probe_delay=0.5, probe_max_delay=16.0)
    h.open()
    assert h.breaker.probe_wait() == 0.5
    h.breaker.record_event(success=True)  # half-open
    h.calls(False)  # the trial fails: open again
    assert h.breaker.state is S.OPEN
    assert h.breaker.probe_wait() == 1.0
    h.breaker.record_event(success=True)
    h.calls(True)  # closed by the trial: not yet a call that went through while closed
    assert h.breaker.state is S.CLOSED
    h.open()
    assert h.breaker.probe_wait() == 2.0
    h.breaker.record_event(success=True)
    h.calls(True, True)  # the trial, then a call while closed: the streak is over
    h.open()
    assert h.breaker.probe_wait() == 0.5


def test_reset_forgets_the_probe_streak() -> None:
    h = Harness(open_wait=1000.0, probe_delay=0.5)
    h.open()
    h.breaker.record_event(success=True)
    h.calls(False)
    assert h.breaker.probe_wait() == 1.0
    h.breaker.reset()
    assert h.breaker.probe_wait() is None
    h.open()
    assert h.breaker.probe_wait() == 0.5


def test_record_event_in_disabled_counts_but_never_opens() -> None:
    h = Harness()
    h.breaker.disable()
    for _ in range(50):
        h.breaker.record_event(success=False)
    assert h.breaker.state is S.DISABLED
    assert h.breaker.snapshot().consecutive_failures == 50


# ---------------------------------------------------------------------------------------------
# Operator actions
# ---------------------------------------------------------------------------------------------

ALL_STATES = list(BreakerState)


@pytest.mark.parametrize("start", ALL_STATES)
def test_reset_from_every_state(start: BreakerState) -> None:
    h = Harness()
    h.calls(False, False)
    h.to_state(start)
    before = len(h.transitions)
    gen = h.breaker.generation
    h.breaker.reset()
    assert h.breaker.state is S.CLOSED
    snap = h.breaker.snapshot()
    assert (snap.calls_in_window, snap.failures_in_window, snap.consecutive_failures) == (0, 0, 0)
    assert snap.opened_at is None
    if start is S.CLOSED:
        assert len(h.transitions) == before  # no state change, no transition
        assert h.breaker.generation == gen
    else:
        assert len(h.transitions) == before + 1
        assert h.last() == Transition(start, S.CLOSED, h.clock.now, "operator reset")
        assert h.breaker.generation == gen + 1
    assert h.breaker.acquire() is not None


@pytest.mark.parametrize("start", ALL_STATES)
def test_force_open_from_every_state(start: BreakerState) -> None:
    h = Harness()
    h.to_state(start)
    before = len(h.transitions)
    h.breaker.force_open()
    assert h.breaker.state is S.FORCED_OPEN
    if start is S.FORCED_OPEN:
        assert len(h.transitions) == before
    else:
        assert h.last() == Transition(start, S.FORCED_OPEN, h.clock.now, "operator force open")
        assert len(h.transitions) == before + 1
    assert h.breaker.acquire() is None
    assert h.breaker.open_remaining() == math.inf
    h.clock.advance(1e9)  # no wait ends FORCED_OPEN
    assert h.breaker.state is S.FORCED_OPEN
    assert h.breaker.acquire() is None
    h.breaker.reset()
    assert h.breaker.state is S.CLOSED


@pytest.mark.parametrize("start", ALL_STATES)
def test_disable_from_every_state(start: BreakerState) -> None:
    h = Harness()
    h.to_state(start)
    before = len(h.transitions)
    h.breaker.disable()
    assert h.breaker.state is S.DISABLED
    if start is S.DISABLED:
        assert len(h.transitions) == before
    else:
        assert h.last() == Transition(start, S.DISABLED, h.clock.now, "operator disable")
        assert len(h.transitions) == before + 1
    permit = h.breaker.acquire()
    assert permit == Permit(h.breaker.generation, trial=False)
    h.breaker.reset()
    assert h.breaker.state is S.CLOSED


def test_disabled_keeps_counting_but_never_changes_state() -> None:
    h = Harness(slow_call_threshold=1.0)
    h.breaker.disable()
    for _ in range(30):
        permit = h.breaker.acquire()
        assert permit is not None
        h.breaker.record(permit, success=False)
    permit = h.breaker.acquire()
    assert permit is not None
    h.breaker.record(permit, success=True, duration=5.0)
    assert h.breaker.state is S.DISABLED
    snap = h.breaker.snapshot()
    assert snap.calls_in_window == 20
    assert snap.failures_in_window == 20
    assert snap.failure_rate == 1.0
    assert snap.consecutive_failures == 31
    assert (snap.total_calls, snap.total_failures, snap.slow_calls) == (31, 31, 1)
    assert snap.rejected == 0
    assert len(h.transitions) == 1


def test_reset_after_disable_starts_with_an_empty_window() -> None:
    h = Harness()
    h.breaker.disable()
    h.calls(*[False] * 30)
    h.breaker.reset()
    h.calls(False, False, False, False)
    assert h.breaker.state is S.CLOSED  # the 30 disabled-time failures are forgotten


def test_operator_permit_from_before_force_open_is_stale() -> None:
    h = Harness()
    p = h.breaker.acquire()
    assert p is not None
    h.breaker.force_open()
    h.breaker.reset()
    h.breaker.record(p, success=False)
    assert h.breaker.stale == 1
    assert h.breaker.snapshot().calls_in_window == 0


# ---------------------------------------------------------------------------------------------
# on_transition, open_remaining, snapshot
# ---------------------------------------------------------------------------------------------


def test_on_transition_called_once_per_transition_in_order() -> None:
    h = Harness(half_open_calls=1, open_wait=5.0)
    t0 = h.clock.now
    h.calls(*[False] * 5)
    h.clock.advance(5.0)
    p = h.breaker.acquire()
    assert p is not None
    h.breaker.record(p, success=False)
    h.clock.advance(5.0)
    p = h.breaker.acquire()
    assert p is not None
    h.breaker.record(p, success=True)
    h.breaker.force_open()
    h.breaker.disable()
    h.breaker.reset()
    assert h.transitions == [
        Transition(S.CLOSED, S.OPEN, t0, "5 consecutive failures"),
        Transition(S.OPEN, S.HALF_OPEN, t0 + 5, "wait elapsed"),
        Transition(S.HALF_OPEN, S.OPEN, t0 + 5, "trial call failed"),
        Transition(S.OPEN, S.HALF_OPEN, t0 + 10, "wait elapsed"),
        Transition(S.HALF_OPEN, S.CLOSED, t0 + 10, "1 trial call succeeded"),
        Transition(S.CLOSED, S.FORCED_OPEN, t0 + 10, "operator force open"),
        Transition(S.FORCED_OPEN, S.DISABLED, t0 + 10, "operator disable"),
        Transition(S.DISABLED, S.CLOSED, t0 + 10, "operator reset"),
    ]
    assert h.breaker.generation == 8
    assert h.breaker.snapshot().transitions == 8


def test_on_transition_sees_the_breaker_already_in_its_new_state() -> None:
    clock = FakeClock()
    seen: list[tuple[BreakerState, int]] = []
    breaker: CircuitBreaker

    def hook(t: Transition) -> None:
        seen.append((breaker.state, breaker.generation))
        assert breaker.state is t.to_state

    breaker = CircuitBreaker("hsm", BreakerConfig(consecutive_failures=1), clock, hook)
    breaker.record_event(success=False)
    assert seen == [(S.OPEN, 1)]


def test_no_callback_is_fine() -> None:
    breaker = CircuitBreaker("hsm", BreakerConfig(consecutive_failures=1), FakeClock())
    breaker.record_event(success=False)
    assert breaker.state is S.OPEN


def test_open_remaining() -> None:
    h = Harness(open_wait=30.0)
    assert h.breaker.open_remaining() == 0.0
    h.open()
    assert h.breaker.open_remaining() == 30.0
    h.clock.advance(12.5)
    assert h.breaker.open_remaining() == 17.5
    h.clock.advance(17.5)
    assert h.breaker.open_remaining() == 0.0
    assert h.breaker.state is S.HALF_OPEN
    h.breaker.disable()
    assert h.breaker.open_remaining() == 0.0


def test_snapshot_values_and_as_dict() -> None:
    h = Harness(
        window_size=10, minimum_calls=4, consecutive_failures=3, failure_rate_threshold=0.75
    )
    h.calls(True, False, True, False)
    snap = h.breaker.snapshot()
    assert snap == BreakerSnapshot(
        name="billing",
        state=S.CLOSED,
        calls_in_window=4,
        failures_in_window=2,
        failure_rate=0.5,
        consecutive_failures=1,
        open_remaining=0.0,
        opened_at=None,
        rejected=0,
        stale=0,
        transitions=0,
        total_calls=4,
        total_failures=2,
        slow_calls=0,
    )
    h.calls(True)
    assert h.breaker.snapshot().failure_rate == 0.4


def test_snapshot_when_open_and_json() -> None:
    h = Harness(open_wait=30.0)
    h.calls(True)
    h.open()
    h.breaker.acquire()
    h.clock.advance(10.0)
    snap = h.breaker.snapshot()
    assert snap.state is S.OPEN
    assert snap.opened_at == 1000.0
    assert snap.open_remaining == 20.0
    assert snap.failure_rate is None  # 6 calls < minimum 10
    assert (snap.calls_in_window, snap.failures_in_window) == (6, 5)
    assert snap.rejected == 1
    data = snap.as_dict()
    assert data["state"] == "open"
    assert data["open_remaining"] == 20.0
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert set(data) == {
        "name",
        "state",
        "calls_in_window",
        "failures_in_window",
        "failure_rate",
        "consecutive_failures",
        "open_remaining",
        "opened_at",
        "rejected",
        "stale",
        "transitions",
        "total_calls",
        "total_failures",
        "slow_calls",
        "probe_in",
        "probes_failed",
    }
    assert data["probe_in"] == 0.0 and data["probes_failed"] == 0  # the first probe is due


def test_snapshot_forced_open_is_json_ready() -> None:
    h = Harness()
    h.breaker.force_open()
    snap = h.breaker.snapshot()
    assert snap.open_remaining == math.inf
    assert snap.opened_at == h.clock.now
    data = snap.as_dict()
    assert data["open_remaining"] is None
    assert data["state"] == "forced_open"
    json.dumps(data, allow_nan=False)


def test_snapshot_evaluates_the_wait() -> None:
    h = Harness()
    h.open()
    h.clock.advance(30.0)
    assert h.breaker.snapshot().state is S.HALF_OPEN
    assert h.last().to_state is S.HALF_OPEN


# ---------------------------------------------------------------------------------------------
# Random sequences: invariants
# ---------------------------------------------------------------------------------------------


@st.composite
def _configs(draw: st.DrawFn) -> BreakerConfig:
    """Small configs, so that random sequences reach every state often."""
    window = draw(st.integers(1, 6))
    return BreakerConfig(
        window_size=window,
        minimum_calls=draw(st.integers(1, window)),
        failure_rate_threshold=draw(st.sampled_from([0.25, 0.5, 1 / 3, 1.0])),
        consecutive_failures=draw(st.integers(0, 4)),
        slow_call_threshold=draw(st.sampled_from([None, 2.0])),
        open_wait=draw(st.sampled_from([0.0, 5.0])),
        half_open_calls=draw(st.integers(1, 3)),
    )


class BreakerMachine(RuleBasedStateMachine):
    """Random interleavings of calls, outcomes, clock steps and operator actions."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)
        self.transitions: list[Transition] = []
        self.held: list[Permit] = []  # permits issued and not yet settled

    @initialize(config=_configs())
    def build(self, config: BreakerConfig) -> None:
        self.config = config
        self.breaker = CircuitBreaker("m", config, self.clock, self._on_transition)

    def _on_transition(self, t: Transition) -> None:
        self.transitions.append(t)
        assert t.from_state is not t.to_state
        assert t.at == self.clock.now

    def _current_trials(self) -> int:
        gen = self.breaker.generation
        return sum(1 for p in self.held if p.trial and p.generation == gen)

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 4.999, 5.0, 7.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def acquire(self) -> None:
        state = self.breaker.state
        trials_before = self._current_trials()
        rejected = self.breaker.rejected
        permit = self.breaker.acquire()
        if state in (S.OPEN, S.FORCED_OPEN):
            assert permit is None
        if state in (S.CLOSED, S.DISABLED):
            assert permit is not None and not permit.trial
        if state is S.HALF_OPEN and permit is not None:
            assert permit.trial
            assert trials_before < self.config.half_open_calls
        if permit is None:
            assert self.breaker.rejected == rejected + 1
        else:
            assert permit.generation == self.breaker.generation
            self.held.append(permit)

    @precondition(lambda self: bool(self.held))
    @rule(
        data=st.data(),
        success=st.booleans(),
        duration=st.sampled_from([0.0, 1.0, 2.0, 3.0]),
    )
    def record(self, data: st.DataObject, success: bool, duration: float) -> None:
        permit = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        stale = self.breaker.stale
        gen = self.breaker.generation
        self.breaker.record(permit, success=success, duration=duration)
        if permit.generation != gen:
            assert self.breaker.stale == stale + 1
            assert self.breaker.generation == gen  # a stale outcome never moves the state

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        permit = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        gen = self.breaker.generation
        self.breaker.release(permit)
        assert self.breaker.generation == gen

    @rule(success=st.booleans())
    def record_event(self, success: bool) -> None:
        self.breaker.record_event(success=success)

    @rule(action=st.sampled_from(["reset", "force_open", "disable"]))
    def operator(self, action: str) -> None:
        method: Callable[[], None] = getattr(self.breaker, action)
        method()
        expected = {"reset": S.CLOSED, "force_open": S.FORCED_OPEN, "disable": S.DISABLED}
        assert self.breaker.state is expected[action]

    @invariant()
    def state_is_valid(self) -> None:
        state = self.breaker.state
        assert state in set(BreakerState)
        assert self.breaker.generation == len(self.transitions)
        # The reported transitions chain: each starts where the previous ended.
        prev = BreakerState.CLOSED
        for t in self.transitions:
            assert t.from_state is prev
            prev = t.to_state
        assert prev is state

    @invariant()
    def trials_never_exceed_half_open_calls(self) -> None:
        assert self._current_trials() <= self.config.half_open_calls
        if self.breaker.state is not S.HALF_OPEN:
            assert self._current_trials() == 0

    @invariant()
    def snapshot_is_consistent(self) -> None:
        snap = self.breaker.snapshot()
        assert 0 <= snap.failures_in_window <= snap.calls_in_window <= self.config.window_size
        if snap.failure_rate is not None:
            assert snap.calls_in_window >= self.config.minimum_calls
            assert snap.failure_rate == snap.failures_in_window / snap.calls_in_window
        if snap.state is S.CLOSED and snap.failure_rate is not None:
            assert snap.failure_rate < self.config.failure_rate_threshold
        if snap.state is S.CLOSED and self.config.consecutive_failures:
            assert snap.consecutive_failures < self.config.consecutive_failures
        assert (snap.opened_at is not None) == (snap.state in (S.OPEN, S.FORCED_OPEN))
        assert 0.0 <= snap.open_remaining <= self.config.open_wait or (
            snap.state is S.FORCED_OPEN and snap.open_remaining == math.inf
        )
        assert snap.transitions == len(self.transitions)
        json.dumps(snap.as_dict(), allow_nan=False)


BreakerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestBreakerMachine = BreakerMachine.TestCase


def test_closed_calls_share_one_permit_until_the_state_changes() -> None:
    clock = FakeClock()
    b = CircuitBreaker("up", BreakerConfig(consecutive_failures=1), clock)
    first, second = b.acquire(), b.acquire()
    assert first is not None and first is second  # no allocation per call while closed
    assert first == Permit(0, trial=False)
    b.record(first, success=True)
    b.record(second, success=False)  # opens
    assert b.state is S.OPEN
    b.reset()
    fresh = b.acquire()
    assert fresh is not None and fresh.generation == b.generation and fresh is not first
    b.record(first, success=False)  # the old generation's permit is stale
    assert b.state is S.CLOSED and b.stale == 1
