"""Retry and reconnect timing policy: exponential backoff, per-operation retry state.

Everything here is pure: no I/O, no sleeping, no clock of its own. Time comes in as an
explicit ``now`` (monotonic seconds) and randomness as ``rand`` (a callable returning a
float in ``[0, 1)``), so a shell decides when to sleep and tests stay deterministic.

* :class:`Backoff`: the policy, ``base * factor**n`` capped at ``cap``, optional full jitter.
* :class:`RetryState`: one operation's attempts against a policy and an absolute deadline.
* :class:`ReconnectDelay`: the delays of an endless reconnect loop, reset after a success.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "ReconnectDelay", "RetryState"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff: ``base * factor**n``, capped at ``cap``, optional full jitter.

    With the defaults the delays are 1, 2, 4, 8, 16, 16... seconds. ``max_attempts`` counts
    every attempt, the first one included, so 5 attempts have 4 delays between them.

    With ``jitter`` on, a delay is drawn uniformly from ``[0, computed delay)`` ("full
    jitter"): it spreads the retries of many clients that failed together, at the price of
    sometimes retrying almost at once.

    Raises :class:`ValueError` unless ``base > 0``, ``factor >= 1``, ``cap >= base`` (all
    finite) and ``max_attempts >= 1``.
    """

    base: float = 1.0  # first retry delay (course: retry.backoff-delay)
    factor: float = 2.0
    cap: float = 16.0  # largest delay (course: 1, 2, 4, 8, 16 s)
    max_attempts: int = 5  # total attempts, the first included (course: retry.max-attempts 3-5)
    jitter: bool = False  # full jitter: uniform in [0, computed delay)

    def __post_init__(self) -> None:
        # `not (x > 0)` rather than `x <= 0` so that NaN is refused too.
        if not (math.isfinite(self.base) and self.base > 0):
            raise ValueError(f"backoff base must be a finite number > 0, got {self.base!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"backoff factor must be a finite number >= 1, got {self.factor!r}")
        if not (math.isfinite(self.cap) and self.cap >= self.base):
            raise ValueError(
                f"backoff cap must be finite and >= base ({self.base!r}), got {self.cap!r}"
            )
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts!r}")

    def _raw(self, retry: int) -> float:
        """The capped delay before retry ``retry`` without jitter (``retry`` >= 0)."""
        try:
            grown = self.base * self.factor**retry
        except OverflowError:
            # factor**retry no longer fits in a float: far past the cap anyway.
            return self.cap
        return min(self.cap, grown)

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Delay before retry number ``retry`` (0 = the first retry).

        Without jitter: ``min(cap, base * factor**retry)``. With jitter: that value times
        ``rand()``, so uniform in ``[0, computed delay)`` (clamped to ``[0, computed]``
        against float rounding and a misbehaving ``rand``); ``rand`` is only called when
        jitter is on. The result is always within ``[0, cap]``. Raises
        :class:`ValueError` if ``retry < 0``.
        """
        if retry < 0:
            raise ValueError(f"retry must be >= 0, got {retry!r}")
        computed = self._raw(retry)
        if not self.jitter:
            return computed
        # Clamped so that a misbehaving rand() cannot produce a negative or oversize delay.
        return min(computed, max(0.0, computed * rand()))

    def schedule(self) -> list[float]:
        """The delays (no jitter) between the ``max_attempts`` attempts.

        ``max_attempts - 1`` values: ``[1, 2, 4, 8]`` for the defaults, ``[]`` for one attempt.
        """
        return [self._raw(n) for n in range(self.max_attempts - 1)]


class RetryState:
    """One operation's attempts against a policy and an absolute deadline (clock seconds).

    Usage by a shell::

        state = RetryState(policy, deadline=now + 30)
        while True:
            budget = state.begin(now)   # None: no attempt may start (attempts used up or
            if budget is None:          #       deadline passed)
                give_up()
            ... attempt with timeout min(per_attempt_timeout, budget) ...
            delay = state.next_delay(now, rand)   # after a failed attempt; None: give up
            if delay is None:
                give_up()
            sleep(delay)

    Only :meth:`begin` changes the state (it counts the attempt); :meth:`next_delay` and
    :meth:`remaining` are queries, so asking twice is harmless.
    """

    __slots__ = ("attempts", "deadline", "policy")

    def __init__(self, policy: Backoff, *, deadline: float | None) -> None:
        """``deadline`` is absolute, on the same clock as every ``now`` passed later;
        ``None`` means the attempts are limited only by ``policy.max_attempts``."""
        self.policy = policy
        self.deadline = deadline
        self.attempts = 0  # attempts begun

    def remaining(self, now: float) -> float:
        """Seconds left before the deadline (never negative); ``math.inf`` without one."""
        if self.deadline is None:
            return math.inf
        return max(0.0, self.deadline - now)

    def begin(self, now: float) -> float | None:
        """Start an attempt: returns the time budget left for it, or ``None`` if none may start.

        ``None`` when ``max_attempts`` attempts have already begun or the deadline has been
        reached (``now >= deadline``); the attempt is then not counted. The budget is
        ``math.inf`` without a deadline.
        """
        if self.attempts >= self.policy.max_attempts:
            return None
        budget = self.remaining(now)
        if budget <= 0:
            return None
        self.attempts += 1
        return budget

    def next_delay(self, now: float, rand: Callable[[], float] = random.random) -> float | None:
        """The delay before the next attempt, after a failed one; ``None``: give up.

        ``None`` when all ``max_attempts`` attempts have been used, or when the deadline
        would be reached by the end of the delay (``now + delay >= deadline``): an attempt
        starting at the deadline would have no time budget at all. The delay is the
        policy's delay for retry ``attempts - 1`` (jittered if the policy says so).
        Raises :class:`RuntimeError` when called before any attempt began (a shell bug).
        """
        if self.attempts == 0:
            raise RuntimeError("next_delay() called before any attempt began")
        if self.attempts >= self.policy.max_attempts:
            return None
        delay = self.policy.delay(self.attempts - 1, rand)
        if self.deadline is not None and now + delay >= self.deadline:
            return None
        return delay


class ReconnectDelay:
    """Delays for a reconnect loop: Backoff with jitter, no attempt limit; reset() on success.

    The n-th call of :meth:`next` since the last :meth:`reset` returns ``policy.delay(n)``
    (n = 0, 1, 2...): growing up to the cap and staying there. ``policy.max_attempts`` is
    ignored (a connection loop retries forever); jitter applies when ``policy.jitter`` is on.
    """

    __slots__ = ("_failures", "_rand", "policy")

    def __init__(self, policy: Backoff, rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self._rand = rand
        self._failures = 0

    @property
    def failures(self) -> int:
        """Delays handed out since the last reset (consecutive failed connects)."""
        return self._failures

    def next(self) -> float:
        """The delay before the next reconnect attempt (and one more failure counted)."""
        delay = self.policy.delay(self._failures, self._rand)
        self._failures += 1
        return delay

    def reset(self) -> None:
        """Forget the failures (after a successful connect): the next delay is ``base`` again."""
        self._failures = 0
