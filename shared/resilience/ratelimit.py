"""Admission limits: token buckets, sliding-window counters and connection caps.

Everything here is pure bookkeeping: no I/O, no sleeping. Time comes in as an explicit
``now`` or from an injected ``clock`` (monotonic seconds); the caller decides what a
refusal means (an ISO decline, a closed socket, an HTTP 429 with ``Retry-After``).

* :class:`TokenBucket`: a rate with a burst allowance, for one stream of requests.
* :class:`KeyedRateLimiter`: one token bucket per key (an institution, a terminal).
* :class:`WindowCounter`: at most N events per key in any sliding window (a velocity limit).
* :class:`ConnectionLimiter`: concurrent connections per source address and in total.
* :class:`LogThrottle`: at most one log line per key per interval, counting the rest.

The keyed classes keep at most ``max_keys`` keys, dropping the least recently used, so a
flood of distinct keys cannot grow memory without bound. The price: a dropped key starts
afresh (a full bucket, an empty window), which errs on the side of letting traffic through.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable

__all__ = ["ConnectionLimiter", "KeyedRateLimiter", "LogThrottle", "TokenBucket", "WindowCounter"]

# Float slack when comparing token counts: (n - tokens) / rate * rate may round down.
_EPSILON = 1e-9
# A bound on the ulp steps of _nudge(); two or three are the most ever seen needed.
_MAX_NUDGES = 64


def _nudge(now: float, wait: float, ready: Callable[[float], bool]) -> float:
    """``wait``, raised by as few ulps as it takes for ``ready(now + wait)`` to hold.

    A wait computed exactly in real numbers can fall short in floats: with a monotonic
    clock at 1e6 s, ``now + wait`` loses the low bits of ``wait``. retry_after() promises
    that the caller's own ``now + wait`` is late enough, so that sum is what is checked.
    """
    for _ in range(_MAX_NUDGES):
        if ready(now + wait):
            break
        wait += math.ulp(now + wait)
    return wait


def _check_max_keys(max_keys: int) -> None:
    if max_keys < 1:
        raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")


def _check_n(n: float) -> None:
    if not (n >= 0):  # also refuses NaN
        raise ValueError(f"token count must be >= 0, got {n!r}")


class TokenBucket:
    """``rate`` tokens per second, up to ``burst``. ``rate <= 0`` means unlimited.

    The bucket starts full at ``now``. A ``now`` earlier than one already seen (which a
    monotonic clock never gives) is treated as no time passing, never as tokens taken back.
    Raises :class:`ValueError` when limited and ``burst`` is not > 0, or when ``rate`` or
    ``burst`` is not finite.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not math.isfinite(rate):
            raise ValueError(f"rate must be finite, got {rate!r}")
        if rate > 0 and not (math.isfinite(burst) and burst > 0):
            raise ValueError(f"burst must be a finite number > 0, got {burst!r}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    @property
    def unlimited(self) -> bool:
        """True when ``rate <= 0``: every take succeeds."""
        return self.rate <= 0

    def available(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (``math.inf`` when unlimited); changes nothing."""
        if self.unlimited:
            return math.inf
        elapsed = max(0.0, now - self._last)
        return min(self.burst, self._tokens + elapsed * self.rate)

    def try_take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if the bucket holds them at ``now``; False (and nothing taken)
        otherwise. Always True when unlimited. Raises :class:`ValueError` if ``n < 0``."""
        _check_n(n)
        if self.unlimited:
            return True
        tokens = self.available(now)
        self._tokens = tokens
        self._last = max(self._last, now)
        if tokens + _EPSILON < n:
            return False
        self._tokens = max(0.0, tokens - n)
        return True

    def retry_after(self, now: float, n: float = 1.0) -> float:
        """Seconds from ``now`` until ``n`` tokens are available: 0.0 if they are now.

        ``try_take(now + retry_after(now, n), n)`` succeeds if nothing else takes tokens
        meanwhile. ``math.inf`` when ``n`` exceeds ``burst``: the bucket never holds that
        many. Always 0.0 when unlimited. Changes nothing.
        """
        _check_n(n)
        if self.unlimited:
            return 0.0
        tokens = self.available(now)
        if tokens + _EPSILON >= n:
            return 0.0
        if n > self.burst + _EPSILON:
            return math.inf
        return _nudge(now, (n - tokens) / self.rate, lambda at: self.available(at) + _EPSILON >= n)


class KeyedRateLimiter:
    """One TokenBucket per key (institution, terminal...), at most ``max_keys`` kept.

    The least recently used bucket is dropped when a new key would exceed ``max_keys``: a
    dropped key starts full again. ``rate <= 0`` disables the limiter (``enabled`` False):
    everything is allowed and no key is stored. Each :meth:`allow` takes one token, so a
    ``burst`` below 1 (a fractional rate times a burst multiple, say) is raised to 1: a
    smaller bucket would refuse every request. Raises :class:`ValueError` when
    ``max_keys < 1``, or when enabled with a ``rate`` or ``burst`` that is not finite.
    """

    __slots__ = ("_buckets", "_clock", "burst", "enabled", "max_keys", "rate")

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float], max_keys: int = 10_000
    ) -> None:
        _check_max_keys(max_keys)
        self.enabled = rate > 0
        if self.enabled:
            if not (math.isfinite(rate) and math.isfinite(burst)):
                raise ValueError(f"rate and burst must be finite, got {rate!r} and {burst!r}")
            burst = max(burst, 1.0)
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        """Keys currently tracked."""
        return len(self._buckets)

    def allow(self, key: str) -> bool:
        """Take a token from ``key``'s bucket: True if there was one. Marks ``key`` used."""
        if not self.enabled:
            return True
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.try_take(now)

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may pass again (0.0 now). A read: ``key`` is not marked
        used, and an unknown key (never seen, or dropped) has a full bucket: 0.0."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        return bucket.retry_after(self._clock())


class WindowCounter:
    """At most ``limit`` events per key in any sliding ``window`` seconds.

    For example, payments per customer per hour. An event counts for exactly ``window``
    seconds: one at ``t`` no longer counts at ``t + window``. ``limit <= 0``: unlimited,
    and no key is stored. At most ``max_keys`` keys are kept (the least recently used is
    dropped and starts with an empty window). Memory is at most ``limit`` timestamps per
    key. The clock must be monotonic. Raises :class:`ValueError` unless ``window > 0``
    (finite) and ``max_keys >= 1``.
    """

    __slots__ = ("_clock", "_events", "limit", "max_keys", "window")

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float], max_keys: int = 10_000
    ) -> None:
        _check_max_keys(max_keys)
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a finite number > 0, got {window!r}")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """False when ``limit <= 0`` (unlimited)."""
        return self.limit > 0

    def __len__(self) -> int:
        """Keys currently tracked."""
        return len(self._events)

    def _expire(self, events: deque[float], now: float) -> None:
        horizon = now - self.window
        while events and events[0] <= horizon:
            events.popleft()

    def count(self, key: str) -> int:
        """Events of ``key`` still inside the window. A read: ``key`` is not marked used."""
        events = self._events.get(key)
        if events is None:
            return 0
        horizon = self._clock() - self.window
        return sum(1 for t in events if t > horizon)

    def allow(self, key: str) -> bool:
        """True, and the event recorded, if ``key`` has had fewer than ``limit`` events in
        the last ``window`` seconds; False (nothing recorded) otherwise. Marks ``key`` used."""
        if not self.enabled:
            return True
        now = self._clock()
        events = self._events.get(key)
        if events is None:
            events = deque()
            self._events[key] = events
            if len(self._events) > self.max_keys:
                self._events.popitem(last=False)
        else:
            self._events.move_to_end(key)
            self._expire(events, now)
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may have another event (0.0 now): when enough of its
        oldest events leave the window. A read: ``key`` is not marked used."""
        if not self.enabled:
            return 0.0
        events = self._events.get(key)
        if events is None:
            return 0.0
        now = self._clock()
        horizon = now - self.window
        live = [t for t in events if t > horizon]
        if len(live) < self.limit:
            return 0.0
        # Once the (len - limit + 1) oldest live events expire, one slot is free.
        freeing = live[len(live) - self.limit]
        return _nudge(now, freeing + self.window - now, lambda at: freeing <= at - self.window)


class ConnectionLimiter:
    """Concurrent connections: at most ``per_source`` per source address and ``total``
    overall (0 = unlimited, for each). Connections are counted even when unlimited.

    Pair every accepted :meth:`acquire` with one :meth:`release`. Raises
    :class:`ValueError` when a limit is negative.
    """

    __slots__ = ("_by_source", "_total", "per_source", "total")

    def __init__(self, *, per_source: int, total: int) -> None:
        if per_source < 0 or total < 0:
            raise ValueError(
                f"connection limits must be >= 0 (0: unlimited), got "
                f"per_source={per_source!r} total={total!r}"
            )
        self.per_source = per_source
        self.total = total
        self._by_source: dict[str, int] = {}
        self._total = 0

    def acquire(self, source: str) -> str | None:
        """Count a new connection from ``source``: ``None`` when accepted, else the reason
        it is refused (nothing counted): ``"per_source"`` or ``"total"``.

        When both limits are reached, ``"per_source"`` is given: it names the source's own
        excess, which is what a log reader needs to see first.
        """
        held = self._by_source.get(source, 0)
        if self.per_source and held >= self.per_source:
            return "per_source"
        if self.total and self._total >= self.total:
            return "total"
        self._by_source[source] = held + 1
        self._total += 1
        return None

    def release(self, source: str) -> None:
        """A connection from ``source`` ended; the source is forgotten at zero.

        Raises :class:`ValueError` when ``source`` holds no connection: an unpaired
        release is a bug that would otherwise let the counts drift.
        """
        held = self._by_source.get(source, 0)
        if held <= 0:
            raise ValueError(f"release() for {source!r}, which holds no connection")
        if held == 1:
            del self._by_source[source]
        else:
            self._by_source[source] = held - 1
        self._total -= 1

    def count(self, source: str | None = None) -> int:
        """Connections held by ``source``, or in total when ``source`` is None."""
        if source is None:
            return self._total
        return self._by_source.get(source, 0)

    def sources(self) -> int:
        """Distinct sources holding at least one connection."""
        return len(self._by_source)


class LogThrottle:
    """At most one log line per key (a connection) per ``interval`` seconds.

    :meth:`admit` says whether a line may be written now and, when it may, how many lines
    of that key were held back since its last one (to report them in the line). At most
    ``max_keys`` keys are kept, the least recently used dropped first (a dropped key may log
    at once again). ``interval <= 0`` admits every line. Raises :class:`ValueError` when
    ``max_keys < 1`` or ``interval`` is not finite.
    """

    __slots__ = ("_clock", "_keys", "interval", "max_keys")

    def __init__(self, interval: float, clock: Callable[[], float], max_keys: int = 4096) -> None:
        _check_max_keys(max_keys)
        if not math.isfinite(interval):
            raise ValueError(f"interval must be finite, got {interval!r}")
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        # key -> [time of the last line written, lines held back since]
        self._keys: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def admit(self, key: str) -> int | None:
        """None: hold this line back (counted). Otherwise write it: the value is how many
        lines of ``key`` were held back since the last one written."""
        now = self._clock()
        entry = self._keys.get(key)
        if entry is None:
            self._keys[key] = [now, 0]
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            return 0
        self._keys.move_to_end(key)
        if self.interval > 0 and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        held = int(entry[1])
        entry[0], entry[1] = now, 0
        return held
