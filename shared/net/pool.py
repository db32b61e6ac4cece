"""A pool of multiplexed connections to one upstream: primary and backup endpoints,
heartbeats, sign-on and sign-off, reconnection with backoff.

The policy parts are plain functions and small classes without I/O (:func:`choose`,
:class:`LinkDialect`, :class:`OutcomeWindow`); :class:`UpstreamPool` is the trio shell.

How the pool behaves (the contract :class:`shared.net.upstream.Upstream` builds on):

* every endpoint (primary, optional backup) has ``max_connections`` *slots*; each slot is
  one task that owns at most one connection and reconnects it. Slots below
  ``min_connections`` are always kept connected; the others open only on demand (when the
  least-busy connection has ``grow_at`` requests in flight) and close again after
  ``idle_close`` seconds without requests;
* a slot connects, signs on (0800/001 on ISO links), and only then offers the connection
  as healthy. A connection that errors, closes or misses a heartbeat is dropped and its
  slot reconnects after an exponential, jittered, capped delay. One slot, one loop: there
  are never two reconnect loops for one slot;
* a connection idle for ``heartbeat_interval`` gets an echo (0800/301, or the HSM's NC);
  no answer within ``heartbeat_timeout`` marks it unhealthy and gets it replaced;
* :meth:`UpstreamPool.call` sends on the healthy connection with the fewest requests in
  flight, primary endpoint first; the backup carries traffic only while the primary has no
  healthy connection, so traffic returns to the primary as soon as it is back;
* a *gate* (the circuit breaker) may hold every slot's connection attempts: while the
  breaker is open, connection attempts and echoes are its probes, one attempt at a time,
  at the pace the breaker sets (a forced-open breaker holds every attempt);
* :meth:`UpstreamPool.close` signs off every connection (0800/002) and closes it.
"""

from __future__ import annotations

import contextlib
import math
import random
import ssl
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

import trio

from shared.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from shared.iso.framing import DEFAULT_MAX_FRAME, HeaderKind
from shared.net.tcp import MultiplexedConnection
from shared.ops.metrics import ServiceMetrics
from shared.resilience.backoff import Backoff, ReconnectDelay

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class NoHealthyConnection(UpstreamUnavailable):
    """No healthy connection to the upstream (nothing was sent)."""


class PoolExhausted(UpstreamUnavailable):
    """Every healthy connection is at its in-flight maximum (nothing was sent)."""


class ConnState(StrEnum):
    """Where one slot's connection is in its life."""

    IDLE = "idle"  # an on-demand slot with no connection and no demand
    WAITING = "waiting"  # waiting to reconnect (backoff) or for the breaker to allow it
    CONNECTING = "connecting"  # TCP connect and sign-on under way
    HEALTHY = "healthy"  # carrying traffic
    UNHEALTHY = "unhealthy"  # failed (error, heartbeat); being closed
    CLOSED = "closed"  # the pool is closed


ROLES = ("primary", "backup")


class LinkDialect(Protocol[T_contra]):
    """What a pool needs to know about the protocol spoken on a link.

    Each method returns ``(payload, key)`` of a request; :meth:`accepted` says whether its
    answer is a success. ``sign_on``/``sign_off`` return None on protocols without them.
    """

    def echo(self) -> tuple[bytes, Hashable]: ...

    def sign_on(self) -> tuple[bytes, Hashable] | None: ...

    def sign_off(self) -> tuple[bytes, Hashable] | None: ...

    def accepted(self, response: T_contra) -> bool: ...


class Gate(Protocol):
    """What the pool asks of the circuit breaker before it touches the network."""

    def connect_wait(self) -> float:
        """Seconds the pool must wait before a connection attempt (0: go; inf: until told)."""
        ...

    def connect_result(self, ok: bool) -> None:
        """A connection attempt (connect and sign-on) succeeded or failed."""
        ...

    def heartbeat_result(self, ok: bool) -> None:
        """An echo was answered in time, or not."""
        ...

    def probe_wait(self) -> float | None:
        """None: echoes go at the heartbeat interval. Else (the breaker is open) seconds until
        an echo on a connection still up is due as a probe."""
        ...


class OpenGate:
    """A gate that never holds anything (a pool without a breaker)."""

    def connect_wait(self) -> float:
        return 0.0

    def probe_wait(self) -> float | None:
        return None

    def connect_result(self, ok: bool) -> None:
        pass

    def heartbeat_result(self, ok: bool) -> None:
        pass


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Sizes and timings of one pool (see the module docstring for their meaning)."""

    min_connections: int = 2
    max_connections: int = 8
    max_in_flight: int = 256
    grow_at: int = 32
    idle_close: float = 60.0
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 5.0
    connect_timeout: float = 2.0
    reconnect: Backoff = field(default_factory=lambda: Backoff(0.5, 2.0, 16.0, 1, jitter=True))
    sign_off_timeout: float = 0.5
    #: TLS client context (None: plain TCP). The handshake verifies the server's certificate
    #: against the host of the endpoint's address and runs within ``connect_timeout``.
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_connections <= self.max_connections or self.max_connections < 1:
            raise ValueError("need 0 <= min_connections <= max_connections and max >= 1")
        if self.max_in_flight < 1 or self.grow_at < 1:
            raise ValueError("max_in_flight and grow_at must be positive")
        if self.heartbeat_interval <= 0 or self.heartbeat_timeout <= 0:
            raise ValueError("heartbeat interval and timeout must be positive")


class OutcomeWindow:
    """Success/failure of the last ``size`` calls: the link's error rate over a window."""

    def __init__(self, size: int = 100) -> None:
        self._outcomes: deque[bool] = deque(maxlen=size)

    def add(self, ok: bool) -> None:
        self._outcomes.append(ok)

    @property
    def calls(self) -> int:
        return len(self._outcomes)

    @property
    def error_rate(self) -> float | None:
        """Failures over calls in the window, or None before the first call."""
        if not self._outcomes:
            return None
        return self._outcomes.count(False) / len(self._outcomes)


@dataclass(frozen=True, slots=True)
class Candidate:
    """What :func:`choose` sees of one connection."""

    role: str
    healthy: bool
    in_flight: int


class Choosable(Protocol):
    """What :func:`choose` reads of a connection: a :class:`Candidate`, or the pool's own
    slot (read directly on the hot path, without building a candidate per request)."""

    @property
    def role(self) -> str: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...


def choose(candidates: Sequence[Choosable], max_in_flight: int) -> int | None:
    """Index of the connection a request should use, or None when no healthy one has room.

    Healthy primary connections first, the one with the fewest requests in flight (the
    first of equals); the backup only when no primary connection is healthy.
    """
    for role in ROLES:
        best: int | None = None
        any_healthy = False
        for i, c in enumerate(candidates):
            if c.role != role or not c.healthy:
                continue
            any_healthy = True
            if c.in_flight < max_in_flight and (
                best is None or c.in_flight < candidates[best].in_flight
            ):
                best = i
        if any_healthy:
            return best  # a full primary is not a reason to send to the backup
    return None


class _Slot(Generic[T]):
    """One connection place of the pool: its task, its connection, its figures."""

    def __init__(self, role: str, address: tuple[str, int], index: int, persistent: bool) -> None:
        self.role = role
        self.address = address
        self.index = index
        self.persistent = persistent
        self.state = ConnState.WAITING if persistent else ConnState.IDLE
        self.conn: MultiplexedConnection[T] | None = None
        self.requests = 0
        self.errors = 0
        self.last_echo_rtt: float | None = None
        self.connected_at: float | None = None
        self.last_used = 0.0
        self.last_error: str | None = None
        self.kick = trio.Event()  # wakes a waiting slot: demand, reconnect now, or close
        self.scope: trio.CancelScope | None = None  # the current connection's scope

    @property
    def healthy(self) -> bool:
        return self.state is ConnState.HEALTHY and self.conn is not None and not self.conn.closed

    @property
    def in_flight(self) -> int:
        return self.conn.in_flight if self.conn is not None else 0

    def wake(self) -> None:
        self.kick.set()

    def view(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "endpoint": self.role,
            "address": f"{self.address[0]}:{self.address[1]}",
            "slot": self.index,
            "state": self.state.value,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "errors": self.errors,
            "last_echo_rtt_ms": None
            if self.last_echo_rtt is None
            else round(self.last_echo_rtt * 1000, 3),
            "connected_for_s": None
            if self.connected_at is None or not self.healthy
            else round(now - self.connected_at, 1),
            "last_error": self.last_error,
        }


class UpstreamPool(Generic[T]):
    """Connections to one upstream (see the module docstring for the whole contract)."""

    def __init__(
        self,
        name: str,
        primary: tuple[str, int],
        decode: Callable[[bytes], tuple[Hashable, T]],
        dialect: LinkDialect[T],
        *,
        metrics: ServiceMetrics,
        log: Any,
        config: PoolConfig | None = None,
        backup: tuple[str, int] | None = None,
        gate: Gate | None = None,
        kind: HeaderKind = HeaderKind.BINARY2,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_unmatched: Callable[[bytes, Hashable | None], None] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.config = config or PoolConfig()
        self.primary = primary
        self.backup = backup
        self._decode = decode
        self._dialect = dialect
        self._metrics = metrics
        self._log = log
        self.gate: Gate = gate or OpenGate()
        self._kind = kind
        self._max_frame = max_frame
        self._on_unmatched = on_unmatched or self._default_unmatched
        self._rand = rand
        self.window = OutcomeWindow()
        self._slots: list[_Slot[T]] = []
        for role, address in (("primary", primary), ("backup", backup)):
            if address is None:
                continue
            for i in range(self.config.max_connections):
                persistent = i < max(self.config.min_connections, 1 if role == "primary" else 0)
                self._slots.append(_Slot(role, address, i, persistent))
        self._changed = trio.Event()  # set whenever a connection becomes healthy
        self._gate_event = trio.Event()  # set whenever the gate (breaker) changes state
        self._closing = False
        self._nursery: trio.Nursery | None = None
        # The series of every successful call, looked up once (a lookup per call costs
        # about as much as the increment).
        self._ok_calls = metrics.upstream_calls_of(name, "ok")
        self._call_duration = metrics.upstream_duration_of(name)
        metrics.unmatched_responses.labels(name)
        for state in ConnState:
            metrics.upstream_connections.labels(name, state.value)
        metrics.heartbeat_failures.labels(name)
        metrics.echo_rtt.labels(name)
        metrics.upstream_in_flight.labels(name)
        self._publish()

    # -- figures ------------------------------------------------------------------------------
    @property
    def healthy_count(self) -> int:
        return sum(1 for s in self._slots if s.healthy)

    @property
    def connected(self) -> bool:
        """True when at least one connection is healthy."""
        return any(s.healthy for s in self._slots)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self._slots)

    @property
    def capacity(self) -> int:
        """How many requests the connections open now may carry at once."""
        return self.healthy_count * self.config.max_in_flight

    def target_connections(self) -> int:
        """Connections the pool tries to keep open (the persistent slots)."""
        return sum(1 for s in self._slots if s.persistent)

    def view(self) -> dict[str, Any]:
        """The pool as shown by ``GET /links`` (JSON-ready)."""
        rtts = [s.last_echo_rtt for s in self._slots if s.last_echo_rtt is not None]
        rate = self.window.error_rate
        return {
            "name": self.name,
            "primary": f"{self.primary[0]}:{self.primary[1]}",
            "backup": None if self.backup is None else f"{self.backup[0]}:{self.backup[1]}",
            "healthy": self.healthy_count,
            "target": self.target_connections(),
            "in_flight": self.in_flight,
            "capacity": self.capacity,
            "active_endpoint": self._active_role(),
            "last_echo_rtt_ms": round(min(rtts) * 1000, 3) if rtts else None,
            "error_rate": None if rate is None else round(rate, 4),
            "calls_in_window": self.window.calls,
            "connections": [s.view() for s in self._slots if s.state is not ConnState.IDLE],
        }

    def _active_role(self) -> str | None:
        for role in ROLES:
            if any(s.healthy and s.role == role for s in self._slots):
                return role
        return None

    def _publish(self) -> None:
        counts = dict.fromkeys(ConnState, 0)
        for s in self._slots:
            counts[s.state] += 1
        for state, n in counts.items():
            self._metrics.upstream_connections.labels(self.name, state.value).set(n)

    def _set_state(self, slot: _Slot[T], state: ConnState) -> None:
        slot.state = state
        self._publish()
        if state is ConnState.HEALTHY:
            self._changed.set()
            self._changed = trio.Event()

    def _default_unmatched(self, payload: bytes, key: Hashable | None) -> None:
        self._metrics.unmatched_responses.labels(self.name).inc()
        self._log.warning("unmatched_response", upstream=self.name, size=len(payload))

    # -- running ------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every slot until :meth:`close`. Reports started at once (not when connected)."""
        self._metrics.upstream_in_flight.labels(self.name).set_function(lambda: self.in_flight)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for slot in self._slots:
                nursery.start_soon(self._run_slot, slot)
            task_status.started()

    async def _run_slot(self, slot: _Slot[T]) -> None:
        delays = ReconnectDelay(self.config.reconnect, self._rand)
        while not self._closing:
            if not slot.persistent and not await self._wait_for_demand(slot):
                continue
            if not await self._wait_for_gate(slot):
                continue
            self._set_state(slot, ConnState.CONNECTING)
            conn = await self._connect(slot)
            if conn is None:
                if self._closing:
                    break
                self._set_state(slot, ConnState.WAITING)
                await self._sleep_or_kick(slot, delays.next())
                continue
            if await self._serve(slot, conn):
                delays.reset()  # it was healthy: the next outage starts from the base delay
            if slot.persistent and not self._closing:
                # Never straight back: a host that accepts and hangs up (a full listener,
                # one shutting down) would be hammered. reconnect() kicks past the delay.
                await self._sleep_or_kick(slot, delays.next())
        self._set_state(slot, ConnState.CLOSED)

    async def _wait_for_demand(self, slot: _Slot[T]) -> bool:
        """An on-demand slot idles until kicked; True when it should connect."""
        self._set_state(slot, ConnState.IDLE)
        await slot.kick.wait()
        slot.kick = trio.Event()
        return not self._closing

    async def _wait_for_gate(self, slot: _Slot[T]) -> bool:
        """Wait while the breaker holds connection attempts; True when one may start."""
        wait = self.gate.connect_wait()
        if wait <= 0:
            return True
        self._set_state(slot, ConnState.WAITING)
        await self._sleep_or_kick(slot, wait)
        return False  # look again: the breaker may have moved, or the pool closed

    async def _sleep_or_kick(self, slot: _Slot[T], seconds: float) -> None:
        with trio.move_on_after(seconds if math.isfinite(seconds) else 3600.0):
            await slot.kick.wait()
        slot.kick = trio.Event()

    async def _connect(self, slot: _Slot[T]) -> MultiplexedConnection[T] | None:
        """Connect and sign on; None on failure (logged, reported to the gate)."""
        cfg = self.config
        stream: trio.abc.Stream | None = None
        raw: trio.SocketStream | None = None
        try:
            with trio.fail_after(cfg.connect_timeout):
                raw = await trio.open_tcp_stream(*slot.address)
                stream = raw
                if cfg.ssl_context is not None:
                    tls = trio.SSLStream(raw, cfg.ssl_context, server_hostname=slot.address[0])
                    await tls.do_handshake()
                    stream = tls
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            if raw is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(raw)
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            if raw is not None and cfg.ssl_context is not None:  # TCP was up: TLS failed
                slot.last_error = f"tls: {type(cause or exc).__name__}"
                self._log.warning(
                    "tls_handshake_failed",
                    upstream=self.name,
                    endpoint=slot.role,
                    reason=getattr(cause, "reason", None) or type(cause or exc).__name__,
                )
            else:
                slot.last_error = f"connect: {type(exc).__name__}"
                self._log.debug("connect_failed", upstream=self.name, endpoint=slot.role)
            self.gate.connect_result(False)
            return None
        assert stream is not None
        conn: MultiplexedConnection[T] = MultiplexedConnection(
            stream,
            self._decode,
            kind=self._kind,
            max_frame=self._max_frame,
            on_unmatched=self._on_unmatched,
        )
        slot.conn = conn
        return conn

    async def _serve(self, slot: _Slot[T], conn: MultiplexedConnection[T]) -> bool:
        """Receive on ``conn``, sign on, heartbeat it, until it fails or the pool closes.

        True when the connection was signed on (it got as far as healthy).
        """
        healthy = False
        try:
            async with trio.open_nursery() as nursery:
                slot.scope = nursery.cancel_scope
                await nursery.start(conn.run)
                if not await self._sign_on(slot, conn):
                    nursery.cancel_scope.cancel()
                    return False
                healthy = True
                slot.connected_at = trio.current_time()
                slot.last_used = slot.connected_at
                slot.last_error = None
                self._set_state(slot, ConnState.HEALTHY)
                self._log.info(
                    "upstream_connected",
                    upstream=self.name,
                    endpoint=slot.role,
                    address=f"{slot.address[0]}:{slot.address[1]}",
                )
                nursery.start_soon(self._heartbeat, slot, conn)
                if not slot.persistent:
                    nursery.start_soon(self._close_when_idle, slot, conn)
                await _wait_closed(conn)
                nursery.cancel_scope.cancel()
        finally:
            slot.scope = None
            slot.conn = None
            with trio.CancelScope(shield=True):
                await conn.aclose()
            if slot.state is ConnState.HEALTHY and not self._closing:
                self._log.warning("upstream_disconnected", upstream=self.name, endpoint=slot.role)
            if not self._closing:
                self._set_state(slot, ConnState.WAITING)
        return healthy

    async def _sign_on(self, slot: _Slot[T], conn: MultiplexedConnection[T]) -> bool:
        request = self._dialect.sign_on()
        ok = True
        if request is not None:
            payload, key = request
            try:
                ok = self._dialect.accepted(
                    await conn.request(payload, key, self.config.connect_timeout)
                )
            except UpstreamError as exc:
                ok = False
                slot.last_error = f"sign-on: {type(exc).__name__}"
            if not ok:
                self._log.warning("sign_on_failed", upstream=self.name, endpoint=slot.role)
        self.gate.connect_result(ok)
        return ok

    async def _heartbeat(self, slot: _Slot[T], conn: MultiplexedConnection[T]) -> None:
        """Echo whenever the connection has been idle for the interval; replace it on a miss.

        While the gate probes (the breaker is open), the echo goes as soon as the probe is
        due instead, the connection being idle since it opened (no call passes)."""
        cfg = self.config
        while not conn.closed:
            idle_until = conn.last_activity + cfg.heartbeat_interval
            probe = self.gate.probe_wait()
            if probe is not None:
                idle_until = min(idle_until, trio.current_time() + probe)
            if trio.current_time() < idle_until:
                changed = self._gate_event
                with trio.move_on_at(idle_until):
                    await changed.wait()  # the breaker moved: look again
                continue
            payload, key = self._dialect.echo()
            start = trio.current_time()
            try:
                ok = self._dialect.accepted(await conn.request(payload, key, cfg.heartbeat_timeout))
                error = None if ok else "echo refused"
            except UpstreamError as exc:
                ok, error = False, f"echo: {type(exc).__name__}"
            self.gate.heartbeat_result(ok)
            if not ok:
                slot.errors += 1
                slot.last_error = error
                self._metrics.heartbeat_failures.labels(self.name).inc()
                self._log.warning("heartbeat_failed", upstream=self.name, endpoint=slot.role)
                self._set_state(slot, ConnState.UNHEALTHY)
                await conn.aclose()
                return
            slot.last_echo_rtt = trio.current_time() - start
            conn.last_activity = trio.current_time()
            self._metrics.echo_rtt.labels(self.name).observe(slot.last_echo_rtt)

    async def _close_when_idle(self, slot: _Slot[T], conn: MultiplexedConnection[T]) -> None:
        """An on-demand connection goes away after ``idle_close`` without requests."""
        while not conn.closed:
            until = slot.last_used + self.config.idle_close
            if trio.current_time() >= until and conn.in_flight == 0:
                self._log.debug("idle_connection_closed", upstream=self.name, slot=slot.index)
                await self._sign_off(conn)
                await conn.aclose()
                return
            await trio.sleep_until(max(until, trio.current_time() + 0.1))

    async def _sign_off(self, conn: MultiplexedConnection[T]) -> None:
        request = self._dialect.sign_off()
        if request is None or conn.closed:
            return
        payload, key = request
        with contextlib.suppress(UpstreamError):
            await conn.request(payload, key, self.config.sign_off_timeout)

    # -- calls --------------------------------------------------------------------------------
    def _pick(self) -> _Slot[T] | None:
        slots = self._slots
        index = choose(slots, self.config.max_in_flight)
        return None if index is None else slots[index]

    def _grow_if_busy(self, slot: _Slot[T]) -> None:
        if slot.in_flight + 1 < self.config.grow_at:
            return
        for s in self._slots:
            if s.role == slot.role and s.state is ConnState.IDLE:
                s.wake()
                return

    async def call(self, payload: bytes, key: Hashable, timeout: float) -> T:
        """One attempt: send on the best healthy connection and return the decoded answer.

        With no healthy connection, waits up to ``connect_timeout`` (within ``timeout``)
        for one. Raises :class:`NoHealthyConnection` / :class:`PoolExhausted` (nothing
        sent), or what :meth:`MultiplexedConnection.request` raises.
        """
        start = trio.current_time()
        slot = self._pick()
        if slot is None:
            slot, timeout = await self._wait_for_slot(start, timeout)
        conn = self._take(slot, start)
        try:
            result = await conn.request(payload, key, timeout)
        except UpstreamError as exc:
            self._count_failure(slot, exc, 1)
            raise
        self._ok_calls.inc()
        self._call_duration.observe(trio.current_time() - start)
        self.window.add(True)
        return result

    async def call_many(
        self, requests: Sequence[tuple[bytes, Hashable]], timeout: float
    ) -> list[T]:
        """One attempt of several ``(payload, key)`` requests on **one** connection, sent
        in one write, answered together (:meth:`MultiplexedConnection.request_many`).

        The rules of :meth:`call` for the group: it waits for a healthy connection the
        same way, and raises what ``request_many`` raises (the whole group fails). Each
        request counts as one call in the metrics and the outcome window.
        """
        start = trio.current_time()
        slot = self._pick()
        if slot is None:
            slot, timeout = await self._wait_for_slot(start, timeout)
        conn = self._take(slot, start)
        n = len(requests)
        try:
            results = await conn.request_many(requests, timeout)
        except UpstreamError as exc:
            self._count_failure(slot, exc, n)
            raise
        self._ok_calls.inc(n)
        elapsed = trio.current_time() - start
        for _ in range(n):
            self._call_duration.observe(elapsed)
            self.window.add(True)
        return results

    async def _wait_for_slot(self, start: float, timeout: float) -> tuple[_Slot[T], float]:
        """No healthy connection has room: wait (up to ``connect_timeout``, within
        ``timeout``) for one; returns it and the time left of ``timeout``."""
        slot: _Slot[T] | None = None
        with trio.move_on_after(min(timeout, self.config.connect_timeout)):
            while slot is None and not self._closing:
                if self.healthy_count:
                    raise PoolExhausted(f"every connection to {self.name} is full")
                await self._changed.wait()
                slot = self._pick()
        if slot is None:
            self._metrics.upstream_calls_of(self.name, "unavailable").inc()
            raise NoHealthyConnection(f"no healthy connection to {self.name}")
        return slot, max(timeout - (trio.current_time() - start), 0.001)

    def _take(self, slot: _Slot[T], now: float) -> MultiplexedConnection[T]:
        """``slot``'s connection, for a request starting ``now``."""
        conn = slot.conn
        assert conn is not None
        self._grow_if_busy(slot)
        slot.requests += 1
        slot.last_used = now
        return conn

    def _count_failure(self, slot: _Slot[T], exc: UpstreamError, n: int) -> None:
        outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "unavailable"
        self._metrics.upstream_calls_of(self.name, outcome).inc(n)
        slot.errors += 1
        for _ in range(n):
            self.window.add(False)

    def record_answer_failure(self) -> None:
        """An answer came but says the upstream failed (a 91/96): it counts as an error."""
        self.window.add(False)

    # -- operator actions and shutdown ---------------------------------------------------------
    def reconnect(self) -> int:
        """Drop every connection and reconnect now (``POST /links/{name}/reconnect``).

        A dropped connection is out of use at once (no request is sent down it any more)
        and its slot reconnects without the reconnect delay; waiting slots retry at once
        instead of finishing their backoff. Returns how many connections were dropped.
        """
        dropped = 0
        for slot in self._slots:
            if slot.scope is not None:
                self._set_state(slot, ConnState.UNHEALTHY)
                slot.scope.cancel()
                dropped += 1
                if slot.persistent:
                    slot.wake()
            elif slot.state is ConnState.WAITING:
                slot.wake()
        self._log.info("link_reconnect_requested", upstream=self.name, dropped=dropped)
        return dropped

    def gate_changed(self) -> None:
        """The gate (breaker) changed state: heartbeats look at its probe schedule again."""
        self._gate_event.set()
        self._gate_event = trio.Event()

    def wake_waiting(self) -> None:
        """Tell waiting slots to look at the gate again (the breaker changed state)."""
        for slot in self._slots:
            if slot.state is ConnState.WAITING:
                slot.wake()

    async def close(self) -> None:
        """Sign off and close every connection; stop reconnecting."""
        if self._closing:
            return
        self._closing = True
        async with trio.open_nursery() as nursery:
            for slot in self._slots:
                if slot.conn is not None and slot.healthy:
                    nursery.start_soon(self._sign_off, slot.conn)
        for slot in self._slots:
            if slot.scope is not None:
                slot.scope.cancel()
            slot.wake()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


async def _wait_closed(conn: MultiplexedConnection[Any]) -> None:
    """Return when ``conn`` has closed (its receive task ends it)."""
    await conn.closed_event.wait()
