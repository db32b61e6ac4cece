"""Tests for shared.resilience.ratelimit: token buckets, keyed limiters, window counters,
connection caps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.resilience.ratelimit import (
    ConnectionLimiter,
    KeyedRateLimiter,
    LogThrottle,
    TokenBucket,
    WindowCounter,
)


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


# ---------------------------------------------------------------------------------------------
# TokenBucket
# ---------------------------------------------------------------------------------------------


def test_bucket_starts_full_and_allows_a_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=3.0, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    assert bucket.try_take(0.0, 2.0)
    assert not bucket.try_take(0.0)
    assert not bucket.try_take(0.25)  # half a token
    assert bucket.try_take(0.5)  # one token
    assert not bucket.try_take(0.5)


def test_bucket_never_holds_more_than_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert bucket.available(1000.0) == 5.0
    assert [bucket.try_take(1000.0) for _ in range(6)] == [True] * 5 + [False]


def test_failed_take_takes_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=3.0, now=0.0)
    assert not bucket.try_take(0.0, 4.0)
    assert bucket.available(0.0) == 3.0
    assert bucket.try_take(0.0, 3.0)


def test_fractional_takes() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0, now=0.0)
    assert bucket.try_take(0.0, 0.5)
    assert bucket.try_take(0.0, 0.5)
    assert not bucket.try_take(0.0, 0.5)
    assert bucket.try_take(0.0, 0.0)  # taking nothing always works


def test_bucket_unlimited() -> None:
    for rate in (0.0, -1.0):
        bucket = TokenBucket(rate=rate, burst=0.0, now=0.0)
        assert bucket.unlimited
        assert all(bucket.try_take(0.0, 1e9) for _ in range(1000))
        assert bucket.retry_after(0.0, 1e9) == 0.0
        assert bucket.available(0.0) == math.inf


def test_bucket_retry_after_is_exact() -> None:
    bucket = TokenBucket(rate=10.0, burst=1.0, now=0.0)
    assert bucket.retry_after(0.0) == 0.0
    assert bucket.try_take(0.0)
    assert bucket.retry_after(0.0) == pytest.approx(0.1)
    assert bucket.retry_after(0.04) == pytest.approx(0.06)
    assert not bucket.try_take(0.0999)
    assert bucket.try_take(0.1)


def test_bucket_retry_after_for_several_tokens() -> None:
    bucket = TokenBucket(rate=2.0, burst=10.0, now=0.0)
    assert bucket.try_take(0.0, 10.0)
    assert bucket.retry_after(0.0, 3.0) == 1.5
    assert bucket.retry_after(1.0, 3.0) == 0.5
    assert bucket.retry_after(1.5, 3.0) == 0.0


def test_bucket_retry_after_changes_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, now=0.0)
    bucket.try_take(0.0, 2.0)
    bucket.retry_after(0.5)
    bucket.retry_after(0.7)
    assert bucket.available(1.0) == 1.0


def test_bucket_retry_after_more_than_burst_is_infinite() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, now=0.0)
    assert bucket.retry_after(0.0, 3.0) == math.inf
    assert not bucket.try_take(1e9, 3.0)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(min_value=0.01, max_value=1e4),
    burst=st.floats(min_value=1.0, max_value=1e3),
    # Monotonic clocks run to large values, where now + wait loses low bits.
    start=st.floats(min_value=0.0, max_value=1e10),
    takes=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=10.0), st.floats(0.0, 1.0)),
        max_size=20,
    ),
    n_frac=st.floats(min_value=0.0, max_value=1.0),
)
def test_bucket_retry_after_is_enough_and_not_too_much(
    rate: float,
    burst: float,
    start: float,
    takes: list[tuple[float, float]],
    n_frac: float,
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst, now=start)
    now = start
    for step, frac in takes:
        now += step
        bucket.try_take(now, frac * burst)
    n = n_frac * burst
    wait = bucket.retry_after(now, n)
    # Never more than a refill from empty, give or take the clock's resolution at `now`.
    assert 0.0 <= wait <= n / rate + 4 * math.ulp(now + n / rate) + 1e-9
    half = now + wait * 0.5
    if (now + wait) - half > wait * 0.25 and wait * rate > 1e-6:
        # Not too much either: half-way through the wait (when the clock can tell the
        # two instants apart) the tokens are not there yet.
        assert bucket.available(half) < n
    assert bucket.try_take(now + wait, n)


@pytest.mark.parametrize("start", [32758.0, 1e7 + 0.1, 123456789.123, 1e10])
def test_bucket_retry_after_holds_on_a_large_clock(start: float) -> None:
    # Found by hypothesis: at 32768 s, (now + 0.00025) - now is not 0.00025, and the
    # refill fell a few 1e-9 tokens short of the promise.
    bucket = TokenBucket(rate=1000.0, burst=1.0, now=start)
    now = start + 10.0
    assert bucket.try_take(now, 0.75)
    wait = bucket.retry_after(now, 0.5)
    # Never noticeably more than the exact 0.00025 s: a few ulps of the clock at most.
    assert wait == pytest.approx(0.00025, abs=4 * math.ulp(now))
    assert bucket.try_take(now + wait, 0.5)


def test_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, now=10.0)
    assert bucket.try_take(10.0, 2.0)
    assert not bucket.try_take(5.0)  # no refill, and no negative refill either
    assert bucket.available(5.0) == 0.0
    assert bucket.try_take(11.0)


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(1.0, 0.0), (1.0, -1.0), (1.0, math.nan), (1.0, math.inf), (math.inf, 1.0), (math.nan, 1.0)],
)
def test_bucket_invalid(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst, now=0.0)


@pytest.mark.parametrize("n", [-1.0, math.nan])
def test_bucket_invalid_take(n: float) -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0, now=0.0)
    with pytest.raises(ValueError):
        bucket.try_take(0.0, n)
    with pytest.raises(ValueError):
        bucket.retry_after(0.0, n)


# ---------------------------------------------------------------------------------------------
# KeyedRateLimiter
# ---------------------------------------------------------------------------------------------


def test_keyed_limits_each_key_separately() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter(rate=1.0, burst=2.0, clock=clock)
    assert limiter.enabled
    assert [limiter.allow("A") for _ in range(3)] == [True, True, False]
    assert [limiter.allow("B") for _ in range(3)] == [True, True, False]
    clock.advance(1.0)
    assert limiter.allow("A")
    assert not limiter.allow("A")


def test_keyed_retry_after() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter(rate=4.0, burst=1.0, clock=clock)
    assert limiter.retry_after("A") == 0.0  # never seen: full
    assert limiter.allow("A")
    assert limiter.retry_after("A") == 0.25
    clock.advance(0.1)
    assert limiter.retry_after("A") == pytest.approx(0.15)
    clock.advance(0.15)
    assert limiter.retry_after("A") == 0.0
    assert limiter.allow("A")


def test_keyed_unlimited_stores_nothing() -> None:
    limiter = KeyedRateLimiter(rate=0.0, burst=0.0, clock=FakeClock())
    assert not limiter.enabled
    assert all(limiter.allow(f"k{i}") for i in range(100))
    assert limiter.retry_after("k1") == 0.0
    assert len(limiter) == 0


def test_keyed_lru_bound_drops_the_least_recently_used() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter(rate=1.0, burst=1.0, clock=clock, max_keys=2)
    assert limiter.allow("A")
    assert limiter.allow("B")
    assert not limiter.allow("A")  # A is now the most recently used
    assert limiter.allow("C")  # drops B, the least recently used
    assert len(limiter) == 2
    assert not limiter.allow("A")  # A kept its (empty) bucket
    assert limiter.allow("B")  # B was dropped: it starts full again (and drops C)
    assert limiter.retry_after("C") == 0.0
    assert len(limiter) == 2


def test_keyed_retry_after_does_not_refresh_recency() -> None:
    limiter = KeyedRateLimiter(rate=1.0, burst=1.0, clock=FakeClock(), max_keys=2)
    limiter.allow("A")
    limiter.allow("B")
    assert limiter.retry_after("A") == 1.0  # a read: A stays least recently used
    limiter.allow("C")
    assert limiter.retry_after("A") == 0.0  # A was dropped
    assert limiter.retry_after("B") == 1.0


def test_keyed_many_keys_stay_bounded() -> None:
    limiter = KeyedRateLimiter(rate=1.0, burst=1.0, clock=FakeClock(), max_keys=50)
    for i in range(1000):
        assert limiter.allow(f"terminal-{i}")
    assert len(limiter) == 50


@pytest.mark.parametrize("burst", [0.0, 0.3, 0.999])
def test_keyed_burst_below_one_is_raised_to_one(burst: float) -> None:
    # The gateway builds burst as rate * multiple: 0.3/s * 2 = 0.6 must still let one
    # request through now and then, not refuse everything (nor fail at startup).
    clock = FakeClock()
    limiter = KeyedRateLimiter(rate=0.3, burst=burst, clock=clock)
    assert limiter.burst == 1.0
    assert limiter.allow("T1")
    assert not limiter.allow("T1")
    assert limiter.retry_after("T1") == pytest.approx(1 / 0.3)
    clock.advance(1 / 0.3)
    assert limiter.allow("T1")


@pytest.mark.parametrize(
    ("rate", "burst", "max_keys"),
    [(1.0, 1.0, 0), (math.inf, 1.0, 10), (1.0, math.inf, 10), (1.0, math.nan, 10)],
)
def test_keyed_invalid(rate: float, burst: float, max_keys: int) -> None:
    with pytest.raises(ValueError):
        KeyedRateLimiter(rate=rate, burst=burst, clock=FakeClock(), max_keys=max_keys)


# ---------------------------------------------------------------------------------------------
# WindowCounter
# ---------------------------------------------------------------------------------------------


def test_window_allows_limit_events_then_refuses() -> None:
    counter = WindowCounter(limit=3, window=3600.0, clock=FakeClock())
    assert counter.enabled
    assert [counter.allow("cust") for _ in range(4)] == [True, True, True, False]
    assert counter.count("cust") == 3  # the refused one is not recorded
    assert counter.allow("other")


def test_window_slides() -> None:
    clock = FakeClock(0.0)
    counter = WindowCounter(limit=2, window=10.0, clock=clock)
    assert counter.allow("k")  # t=0
    clock.advance(4.0)
    assert counter.allow("k")  # t=4
    assert not counter.allow("k")
    clock.advance(5.999)  # t=9.999: the t=0 event still counts
    assert not counter.allow("k")
    assert counter.retry_after("k") == pytest.approx(0.001)
    clock.now = 10.0  # the t=0 event leaves the window exactly now
    assert counter.retry_after("k") == 0.0
    assert counter.count("k") == 1
    assert counter.allow("k")  # t=10
    assert not counter.allow("k")
    assert counter.retry_after("k") == 4.0  # the t=4 event leaves at 14


@settings(max_examples=200, deadline=None)
@given(
    start=st.floats(min_value=0.0, max_value=1e10),
    first=st.floats(min_value=0.0, max_value=100.0),
    window=st.floats(min_value=1e-3, max_value=1e5),
    later=st.floats(min_value=0.0, max_value=1.0),
)
def test_window_retry_after_holds_on_any_clock(
    start: float, first: float, window: float, later: float
) -> None:
    clock = FakeClock(start)
    counter = WindowCounter(limit=1, window=window, clock=clock)
    clock.advance(first)
    assert counter.allow("k")
    clock.advance(later * window)
    wait = counter.retry_after("k")
    assert wait <= window + 4 * math.ulp(clock.now + window)  # a few ulps of nudge at most
    if wait > 0:
        assert not counter.allow("k")
    clock.now = clock.now + wait
    assert counter.allow("k")


def test_window_refusals_do_not_extend_the_block() -> None:
    clock = FakeClock(0.0)
    counter = WindowCounter(limit=1, window=10.0, clock=clock)
    assert counter.allow("k")
    for _ in range(9):
        clock.advance(1.0)
        assert not counter.allow("k")
    clock.advance(1.0)
    assert counter.allow("k")


def test_window_retry_after_unknown_and_unlimited() -> None:
    counter = WindowCounter(limit=1, window=10.0, clock=FakeClock())
    assert counter.retry_after("nobody") == 0.0
    assert counter.count("nobody") == 0
    unlimited = WindowCounter(limit=0, window=10.0, clock=FakeClock())
    assert not unlimited.enabled
    assert all(unlimited.allow("k") for _ in range(1000))
    assert unlimited.retry_after("k") == 0.0
    assert len(unlimited) == 0


def test_window_lru_bound() -> None:
    clock = FakeClock()
    counter = WindowCounter(limit=1, window=60.0, clock=clock, max_keys=2)
    assert counter.allow("A")
    assert counter.allow("B")
    assert not counter.allow("A")  # refused, but A is now the most recently used
    assert counter.allow("C")  # drops B
    assert len(counter) == 2
    assert counter.retry_after("B") == 0.0
    assert counter.allow("B")  # B forgotten: starts with an empty window
    assert counter.retry_after("A") == 0.0  # and B's return dropped A
    assert counter.retry_after("C") == 60.0


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=5),
    window=st.sampled_from([1.0, 2.5, 10.0]),
    steps=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5, 3.0]), max_size=60),
)
def test_window_never_exceeds_limit_in_any_window(
    limit: int, window: float, steps: list[float]
) -> None:
    clock = FakeClock(0.0)
    counter = WindowCounter(limit=limit, window=window, clock=clock)
    accepted: list[float] = []
    for step in steps:
        clock.advance(step)
        wait = counter.retry_after("k")
        ok = counter.allow("k")
        assert ok == (wait == 0.0)
        # A model: the events accepted in (now - window, now].
        recent = [t for t in accepted if t > clock.now - window]
        assert ok == (len(recent) < limit)
        if ok:
            accepted.append(clock.now)
        else:
            assert wait == pytest.approx(recent[len(recent) - limit] + window - clock.now)
    for t in accepted:
        assert sum(1 for u in accepted if t <= u < t + window) <= limit


@pytest.mark.parametrize(
    ("window", "max_keys"), [(0.0, 10), (-1.0, 10), (math.inf, 10), (math.nan, 10), (1.0, 0)]
)
def test_window_invalid(window: float, max_keys: int) -> None:
    with pytest.raises(ValueError):
        WindowCounter(limit=1, window=window, clock=FakeClock(), max_keys=max_keys)


# ---------------------------------------------------------------------------------------------
# ConnectionLimiter
# ---------------------------------------------------------------------------------------------


def test_connections_per_source() -> None:
    limiter = ConnectionLimiter(per_source=2, total=0)
    assert limiter.acquire("10.0.0.1") is None
    assert limiter.acquire("10.0.0.1") is None
    assert limiter.acquire("10.0.0.1") == "per_source"
    assert limiter.acquire("10.0.0.2") is None
    assert limiter.count("10.0.0.1") == 2
    assert limiter.count() == 3  # the refusal was not counted


def test_connections_total() -> None:
    limiter = ConnectionLimiter(per_source=0, total=2)
    assert limiter.acquire("a") is None
    assert limiter.acquire("b") is None
    assert limiter.acquire("c") == "total"
    assert limiter.count("c") == 0
    limiter.release("a")
    assert limiter.acquire("c") is None


def test_connections_per_source_reported_first_when_both_reached() -> None:
    limiter = ConnectionLimiter(per_source=1, total=1)
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") == "per_source"
    assert limiter.acquire("b") == "total"


def test_connections_release_forgets_sources_at_zero() -> None:
    limiter = ConnectionLimiter(per_source=3, total=10)
    limiter.acquire("a")
    limiter.acquire("a")
    limiter.acquire("b")
    assert limiter.sources() == 2
    limiter.release("a")
    assert limiter.count("a") == 1
    limiter.release("a")
    assert limiter.count("a") == 0
    assert limiter.sources() == 1
    assert limiter.count() == 1
    assert limiter.acquire("a") is None


def test_connections_unpaired_release_is_refused() -> None:
    limiter = ConnectionLimiter(per_source=1, total=1)
    with pytest.raises(ValueError):
        limiter.release("ghost")
    limiter.acquire("a")
    limiter.release("a")
    with pytest.raises(ValueError):
        limiter.release("a")
    assert limiter.count() == 0


def test_connections_unlimited_still_counts() -> None:
    limiter = ConnectionLimiter(per_source=0, total=0)
    for _ in range(500):
        assert limiter.acquire("a") is None
    assert limiter.count("a") == limiter.count() == 500


@pytest.mark.parametrize(("per_source", "total"), [(-1, 0), (0, -1)])
def test_connections_invalid(per_source: int, total: int) -> None:
    with pytest.raises(ValueError):
        ConnectionLimiter(per_source=per_source, total=total)


@settings(max_examples=200, deadline=None)
@given(
    per_source=st.integers(0, 3),
    total=st.integers(0, 5),
    ops=st.lists(st.tuples(st.booleans(), st.sampled_from("abc")), max_size=60),
)
def test_connections_model(per_source: int, total: int, ops: list[tuple[bool, str]]) -> None:
    limiter = ConnectionLimiter(per_source=per_source, total=total)
    held: dict[str, int] = {}
    for connect, source in ops:
        if connect:
            reason = limiter.acquire(source)
            if per_source and held.get(source, 0) >= per_source:
                assert reason == "per_source"
            elif total and sum(held.values()) >= total:
                assert reason == "total"
            else:
                assert reason is None
                held[source] = held.get(source, 0) + 1
        elif held.get(source):
            limiter.release(source)
            held[source] -= 1
        assert limiter.count() == sum(held.values())
        assert all(limiter.count(s) == held.get(s, 0) for s in "abc")
        assert limiter.sources() == sum(1 for v in held.values() if v)


# ---------------------------------------------------------------------------------------------
# LogThrottle
# ---------------------------------------------------------------------------------------------


def test_log_throttle_admits_one_line_per_key_per_interval_and_counts_the_rest() -> None:
    clock = FakeClock()
    throttle = LogThrottle(10.0, clock)
    assert throttle.admit("a") == 0
    assert throttle.admit("b") == 0  # each key (connection) on its own
    assert [throttle.admit("a") for _ in range(5)] == [None] * 5
    clock.advance(9.9)
    assert throttle.admit("a") is None
    clock.advance(0.1)
    assert throttle.admit("a") == 6  # the next line says how many were held back
    assert throttle.admit("a") is None
    assert throttle.admit("b") == 0  # its interval is over too, nothing was held back


def test_log_throttle_off_and_bounded() -> None:
    clock = FakeClock()
    every = LogThrottle(0, clock)
    assert [every.admit("a") for _ in range(3)] == [0, 0, 0]
    bounded = LogThrottle(10.0, clock, max_keys=2)
    for key in ("a", "b", "c"):
        assert bounded.admit(key) == 0
    assert len(bounded) == 2
    assert bounded.admit("a") == 0  # dropped as the least recently used: logs again
    with pytest.raises(ValueError):
        LogThrottle(math.inf, clock)
    with pytest.raises(ValueError):
        LogThrottle(1.0, clock, max_keys=0)
