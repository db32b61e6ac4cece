"""A circuit-breaker state machine with an injected clock.

The breaker guards calls to one upstream (a billing host, the HSM, the gateway). It holds
no I/O and never sleeps: the caller asks for a :class:`Permit` before a call and reports
the outcome afterwards; the breaker only counts and moves between states.

States (:class:`BreakerState`)::

    CLOSED --(failure rate / consecutive failures)--> OPEN
    OPEN --(a probe succeeded, or open_wait elapsed)--> HALF_OPEN
    HALF_OPEN --(half_open_calls trials succeeded)--> CLOSED
    HALF_OPEN --(a trial failed)--> OPEN
    any --reset()--> CLOSED    any --force_open()--> FORCED_OPEN    any --disable()--> DISABLED

A breaker judges the **link**, not the answers: the caller reports a call as failed only
for a timeout, a connection refused, reset or closed (and, when configured, a slow answer);
a well-formed answer is a success whatever it says.

While OPEN, the link is **probed**: a connection attempt (connect and sign-on, at the pace
of the pool's reconnect backoff) or an echo on a connection still up, reported with
:meth:`CircuitBreaker.record_event`. A successful probe moves the breaker to HALF_OPEN at
once, so recovery takes about the reconnect backoff; ``open_wait`` is only the longest an
OPEN breaker waits when no probe succeeds. Echoes follow the breaker's own schedule
(:meth:`CircuitBreaker.probe_wait`): the first may go ``probe_delay`` seconds after
opening, each failed probe doubles the wait (at most ``probe_max_delay``), and so does each
reopening before a call succeeded again, so that an upstream that answers echoes but not
calls gets fewer and fewer trial calls.

Every state change is a :class:`Transition`: it bumps the breaker's *generation* and is
reported once to ``on_transition``. A permit remembers the generation it was issued in, so
an outcome that arrives after the state changed (a slow call finishing after the breaker
opened) is recognised as stale and cannot disturb the new state.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "CircuitBreaker",
    "Permit",
    "Transition",
]


class BreakerState(StrEnum):
    """Where a breaker stands."""

    CLOSED = "closed"  # calls pass, outcomes are counted
    OPEN = "open"  # calls are refused until open_wait has elapsed
    HALF_OPEN = "half_open"  # a few trial calls pass to probe the upstream
    FORCED_OPEN = "forced_open"  # operator: refuse everything until reset()
    DISABLED = "disabled"  # operator: pass everything, keep counting, until reset()


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The thresholds of one breaker.

    Raises :class:`ValueError` unless ``window_size >= 1``,
    ``1 <= minimum_calls <= window_size`` (a larger minimum could never be reached),
    ``0 < failure_rate_threshold <= 1``, ``consecutive_failures >= 0``,
    ``slow_call_threshold`` is ``None`` or ``> 0``, ``open_wait >= 0`` (finite),
    ``half_open_calls >= 1`` and ``0 < probe_delay <= probe_max_delay`` (finite).
    """

    window_size: int = 20  # count-based sliding window of the last N calls
    minimum_calls: int = 10  # no failure-rate decision before this many calls in the window
    failure_rate_threshold: float = 0.5  # open when failures/calls >= threshold (reached: opens)
    consecutive_failures: int = 5  # or after this many failures in a row (0 disables this rule)
    slow_call_threshold: float | None = None  # seconds; a success slower than this is a failure
    open_wait: float = 30.0  # seconds OPEN before HALF_OPEN when no probe succeeded first
    half_open_calls: int = 1  # trial calls let through in HALF_OPEN; all must succeed to close
    probe_delay: float = 0.5  # seconds OPEN before the first probe; doubles per failed probe
    probe_max_delay: float = 16.0  # cap of the wait between two probes

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size!r}")
        if not 1 <= self.minimum_calls <= self.window_size:
            raise ValueError(
                f"minimum_calls must be in [1, window_size={self.window_size}], "
                f"got {self.minimum_calls!r}"
            )
        # Written as `not (a < x <= b)` so that NaN is refused too.
        if not (0 < self.failure_rate_threshold <= 1):
            raise ValueError(
                f"failure_rate_threshold must be in (0, 1], got {self.failure_rate_threshold!r}"
            )
        if self.consecutive_failures < 0:
            raise ValueError(
                f"consecutive_failures must be >= 0, got {self.consecutive_failures!r}"
            )
        if self.slow_call_threshold is not None and not (self.slow_call_threshold > 0):
            raise ValueError(
                f"slow_call_threshold must be None or > 0, got {self.slow_call_threshold!r}"
            )
        if not (math.isfinite(self.open_wait) and self.open_wait >= 0):
            raise ValueError(f"open_wait must be a finite number >= 0, got {self.open_wait!r}")
        if self.half_open_calls < 1:
            raise ValueError(f"half_open_calls must be >= 1, got {self.half_open_calls!r}")
        if not (0 < self.probe_delay <= self.probe_max_delay < math.inf):
            raise ValueError(
                "need 0 < probe_delay <= probe_max_delay (finite), got "
                f"{self.probe_delay!r} and {self.probe_max_delay!r}"
            )

    def probe_wait_after(self, failures: int) -> float:
        """Seconds between probes after ``failures`` failed probes or reopenings."""
        return min(self.probe_delay * 2.0 ** min(failures, 64), self.probe_max_delay)


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change: from where, to where, when (clock seconds) and why."""

    from_state: BreakerState
    to_state: BreakerState
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call, issued by :meth:`CircuitBreaker.acquire`.

    Every permit must be settled exactly once: :meth:`~CircuitBreaker.record` with the
    outcome, or :meth:`~CircuitBreaker.release` if the call was cancelled before any.
    """

    generation: int  # the breaker's generation when issued: outcomes of older ones are stale
    trial: bool  # True for a HALF_OPEN trial call
    # Tells trial permits apart, so that settling one twice cannot free another's slot.
    # Always 0 for non-trial permits, which hold no slot.
    serial: int = 0


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker's figures at one instant, for status pages and metrics.

    ``failure_rate`` is ``None`` while the window holds fewer than ``minimum_calls`` calls
    (no rate decision is made then). ``open_remaining`` is ``math.inf`` when FORCED_OPEN.
    ``opened_at`` is set in OPEN and FORCED_OPEN only; ``probe_in`` (seconds until the
    next probe may go) in OPEN only, ``probes_failed`` counts the failed probes of the
    current open period. ``rejected``, ``stale``, ``transitions`` and the ``total_*``
    counters run from the breaker's creation.
    """

    name: str
    state: BreakerState
    calls_in_window: int
    failures_in_window: int
    failure_rate: float | None
    consecutive_failures: int
    open_remaining: float
    opened_at: float | None
    rejected: int
    stale: int
    transitions: int
    total_calls: int
    total_failures: int
    slow_calls: int
    probe_in: float | None = None
    probes_failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-ready values: the state as its string, and an infinite
        ``open_remaining`` (FORCED_OPEN) as ``None``, since JSON has no infinity."""
        data = asdict(self)
        data["state"] = self.state.value
        if math.isinf(self.open_remaining):
            data["open_remaining"] = None
        return data


class CircuitBreaker:
    """A circuit breaker for one upstream; see the module docstring for the states.

    Usage by a shell::

        permit = breaker.acquire()
        if permit is None:
            fail_fast()                          # refused: OPEN, FORCED_OPEN or trials busy
        try:
            outcome = call(...)
        except Cancelled:
            breaker.release(permit)              # no outcome: frees a trial slot
            raise
        breaker.record(permit, success=not outcome.transport_failure, duration=elapsed)

    The clock is read only when a time is needed (a transition, the OPEN wait). Nothing
    changes state except the methods below and the :attr:`state` property, which moves
    OPEN to HALF_OPEN once ``open_wait`` has elapsed. ``on_transition`` is called after the
    breaker is fully in its new state, so it may read the breaker; if it raises, the
    exception reaches the caller of the method that caused the transition.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        clock: Callable[[], float],
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._generation = 0
        #: The permit of every non-trial call in this generation: it holds no slot and is
        #: immutable, so one object serves them all (no allocation per call).
        self._permit = Permit(0, trial=False)
        # The sliding window: True for a failed call. Its failure count is kept alongside
        # so that a decision costs O(1) rather than a scan of the window.
        self._window: deque[bool] = deque(maxlen=config.window_size)
        self._window_failures = 0
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trials_out: set[int] = set()  # serials of HALF_OPEN trial permits not yet settled
        self._trials_ok = 0  # HALF_OPEN trial successes in this half-open period
        self._serial = 0  # the last trial serial handed out
        self._rejected = 0
        self._stale = 0
        self._total_calls = 0
        self._total_failures = 0
        self._slow_calls = 0
        # Probing while OPEN: openings since a call last succeeded, failed probes of this
        # open period, and when the next probe may go.
        self._streak = 0
        self._probes_failed = 0
        self._next_probe_at: float | None = None

    # -- queries -------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state; reading it moves OPEN to HALF_OPEN once ``open_wait`` elapsed
        (at exactly ``open_wait`` seconds, not before), with reason ``"wait elapsed"``."""
        if self._state is BreakerState.OPEN:
            assert self._opened_at is not None
            now = self._clock()
            if now - self._opened_at >= self.config.open_wait:
                self._transition(BreakerState.HALF_OPEN, "wait elapsed", now)
        return self._state

    @property
    def generation(self) -> int:
        """How many transitions have happened; permits carry the value they were issued in."""
        return self._generation

    @property
    def rejected(self) -> int:
        """Permits refused by :meth:`acquire` since creation."""
        return self._rejected

    @property
    def stale(self) -> int:
        """Outcomes ignored because their permit predates the current state."""
        return self._stale

    def open_remaining(self) -> float:
        """Seconds until HALF_OPEN when OPEN; ``0.0`` otherwise; ``math.inf`` when FORCED_OPEN.

        Reads :attr:`state`, so it may itself move OPEN to HALF_OPEN (and return ``0.0``).
        """
        state = self.state
        if state is BreakerState.FORCED_OPEN:
            return math.inf
        if state is BreakerState.OPEN:
            assert self._opened_at is not None
            # The same `elapsed` the state property compares with open_wait, so that a
            # positive remainder and the OPEN state always agree (no rounding drift).
            elapsed = self._clock() - self._opened_at
            return max(0.0, self.config.open_wait - elapsed)
        return 0.0

    def probe_wait(self) -> float | None:
        """OPEN: seconds until the next probe may go (0.0: now). Other states: None (FORCED_OPEN
        is never probed; HALF_OPEN and CLOSED need no probe schedule). Reads :attr:`state`."""
        if self.state is not BreakerState.OPEN:
            return None
        assert self._next_probe_at is not None
        return max(0.0, self._next_probe_at - self._clock())

    def snapshot(self) -> BreakerSnapshot:
        """The breaker's figures now (reads :attr:`state`, like :meth:`open_remaining`)."""
        probe_in = self.probe_wait()
        state = self.state
        calls = len(self._window)
        rate = self._window_failures / calls if calls >= self.config.minimum_calls else None
        return BreakerSnapshot(
            name=self.name,
            state=state,
            calls_in_window=calls,
            failures_in_window=self._window_failures,
            failure_rate=rate,
            consecutive_failures=self._consecutive,
            open_remaining=self.open_remaining(),
            opened_at=self._opened_at,
            rejected=self._rejected,
            stale=self._stale,
            transitions=self._generation,
            total_calls=self._total_calls,
            total_failures=self._total_failures,
            slow_calls=self._slow_calls,
            probe_in=probe_in,
            probes_failed=self._probes_failed if state is BreakerState.OPEN else 0,
        )

    # -- calls ---------------------------------------------------------------------------

    def acquire(self) -> Permit | None:
        """Ask to make a call: a permit, or ``None`` (refused, counted in :attr:`rejected`).

        CLOSED and DISABLED: always a permit. OPEN and FORCED_OPEN: never. HALF_OPEN: a
        trial permit while fewer than ``half_open_calls`` trials are outstanding or have
        succeeded, so at most ``half_open_calls`` trials are ever in flight.
        """
        if self._state is BreakerState.CLOSED:  # the usual case: one shared permit
            return self._permit
        state = self.state
        if state in (BreakerState.CLOSED, BreakerState.DISABLED):
            return self._permit
        if (
            state is BreakerState.HALF_OPEN
            and len(self._trials_out) + self._trials_ok < self.config.half_open_calls
        ):
            self._serial += 1
            self._trials_out.add(self._serial)
            return Permit(self._generation, trial=True, serial=self._serial)
        self._rejected += 1
        return None

    def record(self, permit: Permit, *, success: bool, duration: float = 0.0) -> None:
        """Report the outcome of a call made under ``permit``.

        ``success=False`` is a failure of the link (a timeout, a connection refused, reset
        or closed); any well-formed answer is a success, whatever it says: the caller decides.
        A success slower than ``slow_call_threshold`` seconds counts as a failure.

        A permit from an older generation is ignored and counted in :attr:`stale`: the
        state it was issued for is gone, and its outcome must not move the new one. So is
        a trial permit already settled (recorded or released before).

        CLOSED: the outcome enters the window; the breaker opens on
        ``consecutive_failures`` failures in a row, or when, after any outcome, the window
        holds at least ``minimum_calls`` calls and the failure rate reaches the threshold.
        HALF_OPEN (a trial): a failure reopens (a new open period); the
        ``half_open_calls``-th success closes, with an empty window.
        DISABLED: counted like CLOSED, but the state never changes.
        """
        if permit.generation != self._generation:
            self._stale += 1
            return
        if (
            success
            and self._state is BreakerState.CLOSED
            and not permit.trial
            and self.config.slow_call_threshold is None
        ):
            self._streak = 0
            self._closed_success()
            return
        if permit.trial:
            if permit.serial not in self._trials_out:
                # Already settled (a caller bug): a second outcome must not count twice.
                self._stale += 1
                return
            self._trials_out.discard(permit.serial)
        elif self._state not in (BreakerState.CLOSED, BreakerState.DISABLED):
            # A non-trial permit of the current generation exists only in CLOSED/DISABLED.
            self._stale += 1
            return
        slow = (
            success
            and self.config.slow_call_threshold is not None
            and duration > self.config.slow_call_threshold
        )
        if slow:
            self._slow_calls += 1
        failed = not success or slow
        if not failed and not permit.trial:
            self._streak = 0  # a call went through while closed: the next opening starts over
        self._outcome(failed=failed, slow=slow)

    def release(self, permit: Permit) -> None:
        """Settle a permit whose call was cancelled before any outcome.

        Frees its trial slot (HALF_OPEN) and records nothing. A stale permit, one already
        settled, or one that holds no slot (not a trial) is ignored.
        """
        if permit.trial and permit.generation == self._generation:
            self._trials_out.discard(permit.serial)

    def record_event(self, *, success: bool) -> None:
        """Report an outcome not tied to a permit (a heartbeat, a connect attempt).

        CLOSED/DISABLED: the same as a call's outcome. HALF_OPEN: a failure reopens and a
        success counts as a trial success (it may close the breaker). OPEN: the event is a
        probe of the link: a success moves to HALF_OPEN at once ("probe succeeded"); a
        failure puts the next probe further off (see :meth:`probe_wait`). FORCED_OPEN:
        ignored (an operator decided).
        """
        state = self.state
        if state is BreakerState.FORCED_OPEN:
            return
        if state is BreakerState.OPEN:
            now = self._clock()
            if success:
                self._transition(BreakerState.HALF_OPEN, "probe succeeded", now)
            else:
                self._probes_failed += 1
                wait = self.config.probe_wait_after(self._streak - 1 + self._probes_failed)
                self._next_probe_at = now + wait
            return
        self._outcome(failed=not success, slow=False)

    # -- operator ------------------------------------------------------------------------

    def reset(self) -> None:
        """Operator: back to CLOSED with an empty window, from any state.

        Also ends FORCED_OPEN and DISABLED. From CLOSED it only clears the window and the
        consecutive count: no state change, so no transition.
        """
        self._streak = 0
        if self._state is BreakerState.CLOSED:
            self._clear_window()
            return
        self._transition(BreakerState.CLOSED, "operator reset", self._clock())

    def force_open(self) -> None:
        """Operator: refuse every call (FORCED_OPEN) until :meth:`reset`. No-op if already."""
        if self._state is not BreakerState.FORCED_OPEN:
            self._transition(BreakerState.FORCED_OPEN, "operator force open", self._clock())

    def disable(self) -> None:
        """Operator: pass every call, keep counting (DISABLED) until :meth:`reset`.

        No-op if already DISABLED.
        """
        if self._state is not BreakerState.DISABLED:
            self._transition(BreakerState.DISABLED, "operator disable", self._clock())

    # -- internals -----------------------------------------------------------------------

    def _outcome(self, *, failed: bool, slow: bool) -> None:
        """Count one accepted outcome in the current (CLOSED, DISABLED, HALF_OPEN) state."""
        self._total_calls += 1
        if failed:
            self._total_failures += 1
            self._consecutive += 1
        else:
            self._consecutive = 0

        if self._state is BreakerState.HALF_OPEN:
            if failed:
                why = "trial call slow" if slow else "trial call failed"
                self._transition(BreakerState.OPEN, why, self._clock())
            else:
                self._trials_ok += 1
                if self._trials_ok >= self.config.half_open_calls:
                    n = self._trials_ok
                    why = f"{n} trial call{'s' if n != 1 else ''} succeeded"
                    self._transition(BreakerState.CLOSED, why, self._clock())
            return

        # CLOSED or DISABLED: the window slides; a full deque drops its oldest entry itself,
        # but that entry's failure must leave the count too.
        if len(self._window) == self._window.maxlen and self._window[0]:
            self._window_failures -= 1
        self._window.append(failed)
        if failed:
            self._window_failures += 1

        if self._state is not BreakerState.CLOSED:
            return  # DISABLED counts but never moves
        cfg = self.config
        if cfg.consecutive_failures and self._consecutive >= cfg.consecutive_failures:
            self._transition(
                BreakerState.OPEN, f"{self._consecutive} consecutive failures", self._clock()
            )
            return
        # Checked after successes too: the call that brings the window up to minimum_calls
        # may be a success while the failures already there reach the threshold.
        calls = len(self._window)
        if calls >= cfg.minimum_calls:
            rate = self._window_failures / calls
            if rate >= cfg.failure_rate_threshold:
                self._transition(
                    BreakerState.OPEN, f"failure rate {rate:.0%} over {calls} calls", self._clock()
                )

    def _closed_success(self) -> None:
        """:meth:`_outcome` of a success while CLOSED, the short way (the usual case)."""
        self._total_calls += 1
        self._consecutive = 0
        window = self._window
        if len(window) == window.maxlen and window[0]:
            self._window_failures -= 1
        window.append(False)
        # A success cannot add a failure; the rate can only have reached the threshold if
        # failures are in the window and it just grew to minimum_calls (see _outcome).
        if self._window_failures:
            calls = len(window)
            if calls >= self.config.minimum_calls:
                rate = self._window_failures / calls
                if rate >= self.config.failure_rate_threshold:
                    self._transition(
                        BreakerState.OPEN,
                        f"failure rate {rate:.0%} over {calls} calls",
                        self._clock(),
                    )

    def _clear_window(self) -> None:
        self._window.clear()
        self._window_failures = 0
        self._consecutive = 0

    def _transition(self, to_state: BreakerState, reason: str, now: float) -> None:
        """Enter ``to_state``: set its bookkeeping, bump the generation, then report."""
        from_state = self._state
        self._state = to_state
        self._generation += 1
        self._permit = Permit(self._generation, trial=False)
        # Trial bookkeeping belongs to one half-open period; any transition ends it.
        self._trials_out.clear()
        self._trials_ok = 0
        if to_state in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
            self._opened_at = now
        else:
            self._opened_at = None
        self._probes_failed = 0
        self._next_probe_at = None
        if to_state is BreakerState.OPEN:
            # Each opening before a call succeeds again waits longer for its first probe.
            self._streak += 1
            self._next_probe_at = now + self.config.probe_wait_after(self._streak - 1)
        if to_state is BreakerState.CLOSED:
            self._clear_window()
        if self._on_transition is not None:
            self._on_transition(Transition(from_state, to_state, now, reason))
