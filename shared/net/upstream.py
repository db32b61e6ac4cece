"""One upstream as a service calls it: a connection pool behind a circuit breaker, with
retry on transient failures.

:class:`Upstream` is the thin trio shell; the decisions are made by sans-IO pieces:
:class:`shared.resilience.breaker.CircuitBreaker` (may this call go out?),
:class:`shared.resilience.backoff.RetryState` (may another attempt start, and after how
long?) and :func:`retry_reason` (is this failure worth another attempt?).

What is retried (and why):

* nothing was sent (no healthy connection, every connection full): always, it cannot
  have done anything upstream;
* the connection broke after sending, or the answer did not come in time: only when the
  caller says the message is safe to resend (inquiries, echoes, HSM commands). A payment
  whose outcome is unknown is never resent blindly: the caller answers 68 and reverses it;
* an answer that says the upstream failed (91 issuer inoperative, 96 system malfunction):
  the upstream did nothing durable, so trying again is safe;
* never a business decline (05, 13, 14, 25, 55, 88...), and never a call the open breaker
  refused: failing fast is the breaker's purpose.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import trio

from shared.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from shared.net.pool import UpstreamPool
from shared.ops.metrics import ServiceMetrics
from shared.resilience.backoff import Backoff, RetryState
from shared.resilience.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    Permit,
    Transition,
)

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

#: Retry reasons (the ``reason`` label of ``paylab_upstream_retries_total``).
RETRY_REASONS = ("no_connection", "connection_lost", "timeout", "rc_91", "rc_96")

#: The deadline (trio clock) of the request being served by the current task, if any: an
#: online request sets it once, and every upstream call made for it (HSM and billing, with
#: their retries) ends by then.
request_deadline: ContextVar[float | None] = ContextVar("request_deadline", default=None)

#: A single attempt: the policy of upstreams that do not retry (retries happen in one
#: place, the gateway, so that retries do not multiply along the chain).
NO_RETRY = Backoff(1.0, 2.0, 16.0, 1)


@dataclass(frozen=True, slots=True)
class _Attempt(Generic[T]):
    """The outcome of one attempt: an answer (``failed`` names a failed answer) or an error."""

    answer: T | None = None
    failed: str | None = None
    error: UpstreamError | None = None


class CircuitOpen(UpstreamUnavailable):
    """The breaker refused the call: nothing was sent."""


class AnswerPolicy(Protocol[T_contra]):
    """How to read an answer: None when it is a real answer, else a retry reason."""

    def failed_answer(self, response: T_contra) -> str | None: ...


def retry_reason(exc: UpstreamError, *, resend_safe: bool) -> str | None:
    """Why the failed attempt ``exc`` may be tried again, or None when it must not be."""
    if isinstance(exc, CircuitOpen):
        return None
    if isinstance(exc, UpstreamUnavailable):
        if not exc.sent:
            return "no_connection"
        return "connection_lost" if resend_safe else None
    if isinstance(exc, UpstreamTimeout):
        return "timeout" if resend_safe else None
    return None  # e.g. a duplicate key in flight: resending cannot help


class BreakerGate:
    """Connects the breaker to the pool: the pool's connection attempts and heartbeats
    probe the link while the breaker is open.

    * ``connect_wait``: while open or half-open, **one** connection attempt at a time is
      the probe, at the pace of the slots' own reconnect backoff; the other slots wait for
      its outcome (``probe_timeout`` bounds the wait should the probe vanish). Infinite
      when forced open: no attempts;
    * ``probe_wait``: while open, when an echo on a connection still up is due as a probe
      (the breaker's probe schedule, :meth:`CircuitBreaker.probe_wait`);
    * a connection attempt (connect and sign-on) counts while open or half-open: success
      moves an open breaker to half-open; a missed heartbeat counts as a failure, an
      answered one only while open or half-open (idle echoes do not dilute the window).
    """

    #: How often a slot held back by a probe in progress looks again.
    PROBE_POLL = 0.05

    def __init__(self, breaker: CircuitBreaker, probe_timeout: float = 5.0) -> None:
        self.breaker = breaker
        self._probe_timeout = probe_timeout
        self._probe_since: float | None = None

    def connect_wait(self) -> float:
        state = self.breaker.state
        if state is BreakerState.FORCED_OPEN:
            return math.inf
        if state in (BreakerState.OPEN, BreakerState.HALF_OPEN):
            return self._claim_probe()
        return 0.0

    def _claim_probe(self) -> float:
        """0.0: this attempt is the probe; else how soon to look again (one is under way)."""
        now = trio.current_time()
        if self._probe_since is not None and now - self._probe_since < self._probe_timeout:
            return self.PROBE_POLL
        self._probe_since = now
        return 0.0

    def probe_wait(self) -> float | None:
        return self.breaker.probe_wait()

    def connect_result(self, ok: bool) -> None:
        self._probe_since = None
        if self.breaker.state in (BreakerState.OPEN, BreakerState.HALF_OPEN):
            self.breaker.record_event(success=ok)

    def heartbeat_result(self, ok: bool) -> None:
        if not ok or self.breaker.state in (BreakerState.OPEN, BreakerState.HALF_OPEN):
            self.breaker.record_event(success=ok)


class Upstream(Generic[T]):
    """Calls to one upstream: breaker check, pool, retry with backoff, metrics.

    Contract of :meth:`call`: returns the upstream's answer (possibly a failed answer such
    as a 91 when the retries ran out), or raises :class:`UpstreamError`:
    :class:`CircuitOpen` / ``UpstreamUnavailable(sent=False)`` when nothing was sent,
    ``UpstreamUnavailable(sent=True)`` / :class:`UpstreamTimeout` when the outcome is
    unknown.
    """

    def __init__(
        self,
        pool: UpstreamPool[T],
        answers: AnswerPolicy[T] | None,
        *,
        metrics: ServiceMetrics,
        log: Any,
        breaker: BreakerConfig,
        retry: Backoff = NO_RETRY,
        retry_deadline: float = 30.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = pool.name
        self.pool = pool
        self._answers = answers
        self._metrics = metrics
        self._log = log
        self.retry = retry
        self.retry_deadline = retry_deadline
        self._rand = rand
        self.breaker = CircuitBreaker(
            pool.name, breaker, trio.current_time, on_transition=self._on_transition
        )
        pool.gate = BreakerGate(self.breaker, probe_timeout=2 * pool.config.connect_timeout)
        for reason in RETRY_REASONS:
            metrics.upstream_retries.labels(self.name, reason)
        metrics.upstream_rejected.labels(self.name, "breaker_open")
        for state in BreakerState:
            metrics.breaker_transitions.labels(self.name, state.value)
        self._publish_state(self.breaker.state)

    @property
    def available(self) -> bool:
        """True when a call could go out now: the breaker lets it and a connection is up."""
        return self.breaker_allows and self.pool.connected

    @property
    def breaker_allows(self) -> bool:
        """False while the breaker refuses calls (open or forced open)."""
        return self.breaker.state not in (BreakerState.OPEN, BreakerState.FORCED_OPEN)

    @property
    def connected(self) -> bool:
        return self.pool.connected

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.pool.run(task_status=task_status)

    async def close(self) -> None:
        await self.pool.close()

    # -- breaker bookkeeping ------------------------------------------------------------------
    def _on_transition(self, t: Transition) -> None:
        self._metrics.breaker_transitions.labels(self.name, t.to_state.value).inc()
        self._publish_state(t.to_state)
        log = self._log.warning if t.to_state is BreakerState.OPEN else self._log.info
        log(
            "breaker_transition",
            upstream=self.name,
            from_state=t.from_state.value,
            to_state=t.to_state.value,
            reason=t.reason,
        )
        # Heartbeats switch to (or from) the probe schedule; slots waiting for the breaker
        # look again (a reset or half-open lets them connect).
        self.pool.gate_changed()
        if t.to_state not in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
            self.pool.wake_waiting()

    def _publish_state(self, state: BreakerState) -> None:
        for s in BreakerState:
            self._metrics.breaker_state.labels(self.name, s.value).set(1 if s is state else 0)

    def reset_breaker(self) -> None:
        self.breaker.reset()

    def force_open_breaker(self) -> None:
        self.breaker.force_open()

    def disable_breaker(self) -> None:
        self.breaker.disable()

    # -- calls --------------------------------------------------------------------------------
    async def call(
        self,
        payload: bytes,
        key: Hashable,
        *,
        timeout: float,
        resend_safe: bool,
        deadline: float | None = None,
        retry: bool = True,
    ) -> T:
        """Send one request, retrying transient failures (see the module docstring).

        ``timeout`` bounds each attempt; ``deadline`` (absolute, trio clock) bounds the
        whole call, retries and waits included, together with ``retry_deadline`` and the
        current request's :data:`request_deadline`. ``retry=False`` makes one attempt
        only (the store-and-forward queue keeps its own schedule).
        """
        now = trio.current_time()
        limit = self._limit(now, deadline)
        if limit <= now:  # the request's deadline passed before the first attempt
            raise UpstreamUnavailable(f"{self.name}: no time left for an attempt")
        # The first attempt takes the short way (no retry state, no outcome object): most
        # calls succeed at once, and what only matters for a retry is built only then.
        permit = self._permit()
        try:
            answer = await self.pool.call(payload, key, min(timeout, limit - now))
        except UpstreamError as exc:
            self._settle(permit, now, success=False)
            first: _Attempt[T] = _Attempt(error=exc)
        except BaseException:
            self.breaker.release(permit)  # cancelled: there is no outcome to count
            raise
        else:
            failed = self._failed(answer)
            self._settle(permit, now, success=True)
            if failed is None:
                return answer
            first = _Attempt(answer=answer, failed=failed)
        return await self._retry(
            payload, key, first, timeout=timeout, resend_safe=resend_safe, limit=limit, retry=retry
        )

    async def call_many(
        self,
        requests: Sequence[tuple[bytes, Hashable]],
        *,
        timeout: float,
        resend_safe: bool,
        deadline: float | None = None,
        retry: bool = True,
    ) -> list[T]:
        """Send several ``(payload, key)`` requests together, on one connection in one
        write, and return their answers in order (see :meth:`UpstreamPool.call_many`).

        The group is one attempt for the breaker, the retry schedule and the deadlines,
        with the rules of :meth:`call`: a failure of the link fails the whole group, and a
        retry resends the whole group (so only for requests safe to resend, or when
        nothing was sent). An attempt whose answers include a failed answer (a 91/96) is
        retried like one failed answer; when the retries run out, the answers stand.
        """
        now = trio.current_time()
        limit = self._limit(now, deadline)
        state = RetryState(self.retry if retry else NO_RETRY, deadline=limit)
        while True:
            budget = state.begin(trio.current_time())
            if budget is None:
                raise UpstreamUnavailable(f"{self.name}: no time left for an attempt")
            permit = self._permit()
            start = trio.current_time()
            error: UpstreamError | None = None
            answers: list[T] = []
            try:
                answers = await self.pool.call_many(requests, min(timeout, budget))
            except UpstreamError as exc:
                self._settle(permit, start, success=False)
                error = exc
            except BaseException:
                self.breaker.release(permit)
                raise
            else:
                self._settle(permit, start, success=True)
            if error is not None:
                why = retry_reason(error, resend_safe=resend_safe)
                if why is None:
                    raise error
            else:
                failures = [f for f in map(self._failed, answers) if f is not None]
                if not failures:
                    return answers
                why = failures[0]
            delay = state.next_delay(trio.current_time(), self._rand)
            if delay is None:
                if error is not None:
                    raise error
                return answers
            self._note_retry(why, state.attempts, delay)
            await trio.sleep(delay)

    def _limit(self, now: float, deadline: float | None) -> float:
        """The absolute end of a call: ``retry_deadline`` from now, or sooner."""
        limit = now + self.retry_deadline
        if deadline is None:
            deadline = request_deadline.get()
        if deadline is not None and deadline < limit:
            limit = deadline
        return limit

    def _permit(self) -> Permit:
        """The breaker's leave for one attempt; :class:`CircuitOpen` when refused."""
        permit = self.breaker.acquire()
        if permit is None:
            self._metrics.upstream_rejected.labels(self.name, "breaker_open").inc()
            raise CircuitOpen(f"circuit breaker of {self.name} is open")
        return permit

    def _settle(self, permit: Permit, start: float, *, success: bool) -> None:
        """Report an attempt to the breaker. A well-formed answer is a success, whatever
        it says: the link worked (a 91 may still be retried). The clock is read only when
        the breaker judges slow calls."""
        breaker = self.breaker
        if breaker.config.slow_call_threshold is None:
            breaker.record(permit, success=success)
        else:
            breaker.record(permit, success=success, duration=trio.current_time() - start)

    def _failed(self, answer: T) -> str | None:
        """The retry reason an answer gives (a 91/96), counted as a failed answer."""
        failed = None if self._answers is None else self._answers.failed_answer(answer)
        if failed is not None:
            self.pool.record_answer_failure()
        return failed

    def _note_retry(self, why: str, attempt: int, delay: float) -> None:
        self._metrics.upstream_retries.labels(self.name, why).inc()
        self._log.info(
            "upstream_retry",
            upstream=self.name,
            reason=why,
            attempt=attempt,
            delay_s=round(delay, 3),
        )

    async def _retry(
        self,
        payload: bytes,
        key: Hashable,
        first: _Attempt[T],
        *,
        timeout: float,
        resend_safe: bool,
        limit: float,
        retry: bool,
    ) -> T:
        """After a first attempt that did not give a good answer: retry while the policy,
        the deadline and the failure allow; the last outcome stands."""
        state = RetryState(self.retry if retry else NO_RETRY, deadline=limit)
        state.attempts = 1  # the first attempt, made by call()
        result = first
        while True:
            if result.error is not None:
                why = retry_reason(result.error, resend_safe=resend_safe)
                if why is None:
                    raise result.error
            elif result.failed is None:
                return result.answer  # type: ignore[return-value]
            else:
                why = result.failed
            delay = state.next_delay(trio.current_time(), self._rand)
            if delay is None:  # attempts or time used up: the last outcome stands
                if result.error is not None:
                    raise result.error
                return result.answer  # type: ignore[return-value]
            self._note_retry(why, state.attempts, delay)
            await trio.sleep(delay)
            budget = state.begin(trio.current_time())
            if budget is None:  # the deadline passed during the delay
                raise UpstreamUnavailable(f"{self.name}: no time left for an attempt")
            result = await self._attempt(payload, key, min(timeout, budget))

    async def _attempt(self, payload: bytes, key: Hashable, timeout: float) -> _Attempt[T]:
        """One attempt through the breaker and the pool."""
        try:
            permit = self._permit()
        except CircuitOpen as exc:
            return _Attempt(error=exc)
        start = trio.current_time()
        try:
            answer = await self.pool.call(payload, key, timeout)
        except UpstreamError as exc:
            self._settle(permit, start, success=False)
            return _Attempt(error=exc)
        except BaseException:
            self.breaker.release(permit)  # cancelled: there is no outcome to count
            raise
        failed = self._failed(answer)
        self._settle(permit, start, success=True)
        return _Attempt(answer=answer, failed=failed)

    # -- views ---------------------------------------------------------------------------------
    def link_view(self) -> dict[str, Any]:
        view = self.pool.view()
        view["breaker"] = self.breaker.state.value
        view["service"] = self._metrics.service
        return view

    def breaker_view(self) -> dict[str, Any]:
        """The breaker's snapshot, with the service that owns it (``name`` is the upstream)."""
        view = self.breaker.snapshot().as_dict()
        view["service"] = self._metrics.service
        return view
