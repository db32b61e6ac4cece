"""gateway.saf_rules: the state machine, repeat MTIs, what follows an attempt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.saf_rules import (
    ALLOWED,
    PRIORITY_ADVICE,
    PRIORITY_REVERSAL,
    Outcome,
    SafState,
    SafTransitionError,
    after_attempt,
    check_transition,
    repeat_mti,
)
from shared.errors import PaylabError

Q, F, D, X, C = (
    SafState.QUEUED,
    SafState.IN_FLIGHT,
    SafState.DONE,
    SafState.DEAD,
    SafState.CANCELLED,
)
EXPECTED = {
    (Q, F),
    (Q, C),
    (Q, X),
    (F, D),
    (F, Q),
    (F, X),
    (F, C),
    (X, Q),
    (X, C),
}
T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize("src", list(SafState))
@pytest.mark.parametrize("dst", list(SafState))
def test_transition_table(src: SafState, dst: SafState) -> None:
    if (src, dst) in EXPECTED:
        check_transition(src, dst)
        assert dst in ALLOWED[src]
    else:
        with pytest.raises(SafTransitionError, match=f"from {src.value} to {dst.value}"):
            check_transition(src, dst)
        assert dst not in ALLOWED[src]


def test_table_covers_every_state_and_final_states_are_final() -> None:
    assert set(ALLOWED) == set(SafState)
    assert ALLOWED[D] == frozenset() and ALLOWED[C] == frozenset()
    assert issubclass(SafTransitionError, PaylabError)


def test_priorities() -> None:
    assert PRIORITY_REVERSAL > PRIORITY_ADVICE
    assert (PRIORITY_REVERSAL, PRIORITY_ADVICE) == (100, 50)


@pytest.mark.parametrize(("mti", "repeat"), [("0220", "0221"), ("0420", "0421")])
def test_repeat_mti(mti: str, repeat: str) -> None:
    assert repeat_mti(mti) == repeat


@pytest.mark.parametrize("mti", ["0200", "0221", "0421", "0800", "", "abcd"])
def test_repeat_mti_refuses_others(mti: str) -> None:
    with pytest.raises(ValueError):
        repeat_mti(mti)


def attempt(
    *,
    code: str | None = None,
    error: str | None = None,
    attempts: int = 1,
    max_attempts: int = 5,
    age: timedelta = timedelta(minutes=1),
    max_age: timedelta = timedelta(hours=1),
    delay: float = 30.0,
) -> Outcome:
    return after_attempt(
        attempts=attempts,
        max_attempts=max_attempts,
        created_at=T0,
        max_age=max_age,
        now=T0 + age,
        code=code,
        error=error,
        delay=delay,
    )


def test_approved_is_done() -> None:
    assert attempt(code="00") == Outcome(D, None, "00", None)


@pytest.mark.parametrize("code", ["88", "13", "25", "12", "94", "05", "30", "99"])
def test_final_decline_is_done_with_the_code(code: str) -> None:
    # A non-00 final answer ends the entry too; reconciliation reports it. Even on the
    # last allowed attempt or past max_age: billing answered.
    done = Outcome(D, None, code, None)
    assert attempt(code=code) == done
    assert attempt(code=code, attempts=5, max_attempts=5) == done
    assert attempt(code=code, age=timedelta(days=2)) == done


@pytest.mark.parametrize("code", ["91", "96", "68"])
def test_transient_code_is_retried(code: str) -> None:
    out = attempt(code=code, attempts=2, delay=30)
    assert out.state is Q
    assert out.next_attempt_at == T0 + timedelta(minutes=1, seconds=30)
    assert out.response_code == code
    assert out.error == f"transient response {code}"


def test_transient_code_with_error_text() -> None:
    out = attempt(code="96", error="billing db down")
    assert out.error == "transient response 96: billing db down"


@pytest.mark.parametrize("error", ["timeout", "connection lost", "not sent"])
def test_no_answer_is_retried(error: str) -> None:
    out = attempt(error=error, delay=2.5)
    assert out == Outcome(Q, T0 + timedelta(minutes=1, seconds=2.5), None, error)


def test_no_answer_without_error_text() -> None:
    assert attempt().error == "no answer"


def test_zero_delay_is_due_now() -> None:
    out = attempt(error="timeout", delay=0)
    assert out.next_attempt_at == T0 + timedelta(minutes=1)


@pytest.mark.parametrize("attempts", [5, 6])
def test_attempts_exhausted_is_dead(attempts: int) -> None:
    out = attempt(error="timeout", attempts=attempts, max_attempts=5)
    assert out.state is X and out.next_attempt_at is None and out.response_code is None
    assert out.error == f"timeout; gave up after {attempts} attempts"
    out = attempt(code="91", attempts=attempts, max_attempts=5)
    assert out.state is X and out.response_code == "91"
    assert out.error is not None and out.error.startswith("transient response 91")


def test_one_attempt_left_is_retried() -> None:
    assert attempt(error="timeout", attempts=4, max_attempts=5).state is Q


@pytest.mark.parametrize("age", [timedelta(hours=1), timedelta(hours=5)])
def test_age_exceeded_is_dead(age: timedelta) -> None:
    out = attempt(error="timeout", age=age, max_age=timedelta(hours=1))
    assert out.state is X
    assert out.error == f"timeout; gave up at age {age.total_seconds():.0f}s"


def test_just_younger_than_max_age_is_retried() -> None:
    out = attempt(error="timeout", age=timedelta(minutes=59, seconds=59))
    assert out.state is Q


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        attempt(error="x", delay=-1)
    with pytest.raises(ValueError):
        attempt(error="x", max_attempts=0)
