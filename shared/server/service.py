"""What every paylab service has in common: an ISO/TCP listener, an HTTP listener with
/health and /metrics, upstream links, and an orderly start and stop.

A concrete service subclasses :class:`Service`, builds its handler and links in
``__init__``/:meth:`prepare`, and adds HTTP routes. :meth:`run` starts everything in
one nursery; :meth:`stop` drains: stop accepting and reading, answer what is in flight
(upstream links stay open for it), then close links and HTTP.
"""

from __future__ import annotations

import contextvars
import ssl
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from shared.errors import (
    DecodeError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    ValidationError,
)
from shared.iso import codec
from shared.iso.codes import RC
from shared.iso.messages import Message, is_response, make_response
from shared.iso.validation import validate_request
from shared.net.iso_link import IsoDialect, IsoFrame, decode_iso_keyed
from shared.net.pool import LinkDialect, PoolConfig, UpstreamPool
from shared.net.tcp import FramedServer, InlineHandler
from shared.net.tls import client_check, client_context, server_context
from shared.net.upstream import NO_RETRY, AnswerPolicy, Upstream
from shared.ops.log import get_logger
from shared.ops.metrics import DB_FAILURES, DatabaseMetrics, ServiceMetrics
from shared.ops.settings import Settings
from shared.resilience.backoff import Backoff
from shared.resilience.breaker import BreakerConfig
from shared.resilience.ratelimit import LogThrottle
from shared.server.admin import health_score, link_routes
from shared.server.auth import default_tokens_in_use
from shared.server.fault_api import fault_routes
from shared.server.http import HealthCheck, serve_http, service_app
from shared.server.record import MessageRecord, Query, current_request, json_lines, key_of
from shared.server.record_api import record_routes
from shared.store.db import (
    DatabaseError,
    DatabaseFault,
    connection_transaction,
    make_engine,
    session_factory,
    upgrade,
)
from shared.store.db_thread import DbThread

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

__all__ = [
    "IsoDialect",
    "IsoFrame",
    "IsoService",
    "Ports",
    "Service",
    "database_reason",
    "decode_iso_keyed",
    "encode_upstream",
]


#: The last request encoded by :func:`encode_upstream` in this task: (payload, the message
#: :func:`codec.decode` would give for it), so the record need not decode it again.
_encoded: contextvars.ContextVar[tuple[bytes, Message] | None] = contextvars.ContextVar(
    "paylab_encoded_upstream", default=None
)


def encode_upstream(msg: Message) -> bytes:
    """``codec.encode(msg)`` for a request about to be sent on an ISO upstream link.

    Same bytes; the link's record then takes the message as sent from here (when
    :func:`codec.encode_keeping` can tell it) instead of decoding the payload again.
    """
    payload, decoded = codec.encode_keeping(msg)
    if decoded is not None:
        _encoded.set((payload, decoded))
    return payload


class Dialect(LinkDialect[T_contra], AnswerPolicy[T_contra], Protocol[T_contra]):
    """A link's dialect as a service needs it: echo, sign-on/off, and failed answers."""


R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Ports:
    """Where a running service listens."""

    iso: int
    http: int


class Service:
    """Base of the four services. Subclasses set ``name`` and implement :meth:`handle`."""

    name = "service"
    request_mtis: tuple[str, ...] = ()
    #: Alembic script location of the service's database ("billing:migrations"), or None.
    migrations: str | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = get_logger(self.name)
        self.metrics = ServiceMetrics(self.name, self.request_mtis)
        self.links: list[Upstream[Any]] = []
        #: Every message received and sent (``GET /messages``; ``message_record_size``).
        self.record = MessageRecord(self.name, settings.message_record_size)
        #: HTTP routes added from outside before :meth:`run` (the lab adds its console).
        self.extra_routes: list[BaseRoute] = []
        self.ports: Ports | None = None
        self.server = FramedServer(
            self.name,
            self.handle,
            host=settings.host,
            port=settings.iso_port(self.name),
            metrics=self.metrics,
            log=self.log,
            kind=settings.framing,
            max_frame=settings.max_frame,
            max_in_flight=settings.max_in_flight_per_connection,
            max_connections_per_source=settings.max_connections_per_source,
            max_connections=settings.max_connections,
            frame_timeout=settings.frame_timeout,
            idle_timeout=settings.idle_timeout,
            ssl_context=server_context(settings, self.name),
            handshake_timeout=settings.frame_timeout or 10.0,
            client_check=client_check(settings, self.name),
            inline=self.inline_handler(),
        )
        #: TLS context of this service's upstream links (None: plain TCP).
        self.client_ssl = client_context(settings, self.name)
        self.engine: Engine | None = None
        self.sessions: sessionmaker[Session] | None = None
        #: Injected database unavailability (``POST /faults/database``, ``paylab chaos``).
        self.db_fault = DatabaseFault()
        # One database call at a time per service, in one long-lived thread: SQLite has a
        # single writer anyway, serialising keeps read-check-write sequences free of races on
        # any backend, and a thread kept for good costs no hand-off per call.
        self.db_thread = DbThread(self.name)
        #: Database threads started and stopped with the service (:meth:`add_db_thread`).
        self.db_threads: list[DbThread] = [self.db_thread]
        self.db_metrics = (
            None
            if self.migrations is None
            else DatabaseMetrics(
                self.metrics.registry,
                in_use=self._db_connections_in_use,
                waiting=lambda: self.db_thread.waiting,
            )
        )
        #: The last failed database call: (trio time, reason), for /health.
        self._db_failure: tuple[float, str] | None = None
        self._http_stop = trio.Event()
        self._http_done = trio.Event()
        self._server_done = trio.Event()
        self._stopping = False

    # -- for subclasses ---------------------------------------------------------------------
    async def handle(self, payload: bytes, peer: str) -> bytes | None:
        """Answer one frame (the payload without its length header)."""
        raise NotImplementedError

    def inline_handler(self) -> InlineHandler | None:
        """A synchronous :meth:`handle` for a service whose answers need no waiting at all
        (the HSM): its frames are then answered in the reading task, see
        ``FramedServer(inline=)``. None (the default): a task per frame runs :meth:`handle`."""
        return None

    async def prepare(self) -> None:
        """Set-up before listening: open the database and bring its schema up to date."""
        if self.migrations is not None:
            await trio.to_thread.run_sync(self._open_database, self.migrations)

    def _open_database(self, migrations: str) -> None:
        self.engine = make_engine(self.settings.db_url(self.name))
        upgrade(self.engine, migrations)
        self.db_fault.attach(self.engine)
        self.sessions = session_factory(self.engine)
        self.prepare_database(self.sessions)

    async def start_background(self, nursery: trio.Nursery) -> None:
        """Hook: start the service's own long-running tasks (they must end on :meth:`stop`)."""

    async def stop_background(self) -> None:
        """Hook: end the tasks of :meth:`start_background`; links are still open meanwhile."""

    def prepare_database(self, sessions: sessionmaker[Session]) -> None:
        """Hook (worker thread): build stores on ``sessions``, seed data."""

    def add_db_thread(self, name: str) -> DbThread:
        """Another database thread, started and stopped with the service like
        :attr:`db_thread` (for work that must not queue behind the service's other calls,
        e.g. the gateway's journal)."""
        thread = DbThread(f"{self.name}-{name}")
        self.db_threads.append(thread)
        return thread

    async def in_db_thread(self, fn: Callable[..., R], *args: Any) -> R:
        """Run a synchronous database call in the service's database thread, one at a time
        in submission order (:class:`~shared.store.db_thread.DbThread`: a call still queued
        when its caller is cancelled never runs; one that started is finished and its
        outcome returned). Its wait, duration and failure go to the ``paylab_db_*``
        metrics; a failure also makes ``/health`` report the database failing for
        ``db_failure_hold`` seconds."""
        try:
            if self.db_metrics is None:
                return await self.db_thread.call(fn, *args)
            return await self.db_thread.call(self.db_metrics.instrument(fn, *args))
        except DB_FAILURES as exc:
            self._db_failure = (trio.current_time(), database_reason(exc))
            raise

    def _db_connections_in_use(self) -> float:
        """Connections checked out of the engine's pool (0 before the database is open)."""
        checkedout = getattr(self.engine.pool, "checkedout", None) if self.engine else None
        return float(checkedout()) if checkedout is not None else 0.0

    async def _database_check(self) -> tuple[bool, str]:
        """Ready when a write can be made now (:func:`_write_probe`) and no database call
        failed in the last ``db_failure_hold`` seconds: a full disk fails writes while
        reads (and ``SELECT 1``) still work."""
        if self.engine is None:
            return False, "not open"
        dialect = self.engine.dialect.name
        failed = await self.in_db_thread(_write_probe, self.engine, self.name)
        if failed is not None:
            if self.db_metrics is not None:
                self.db_metrics.errors.inc()
            return False, f"{dialect} not writable: {failed}"
        if self._db_failure is not None:
            at, reason = self._db_failure
            age = trio.current_time() - at
            if age < self.settings.db_failure_hold:
                return False, f"{dialect}: a database call failed {age:.1f} s ago: {reason}"
        return True, f"{dialect} writable"

    def routes(self) -> Sequence[BaseRoute]:
        """Extra HTTP routes beside /health and /metrics."""
        return ()

    def health_checks(self) -> dict[str, HealthCheck]:
        """Readiness checks; by default one per upstream link."""
        checks: dict[str, HealthCheck] = {}
        for link in self.links:
            checks[link.name] = partial(_link_check, link)
        if self.migrations is not None:
            checks["database"] = self._database_check
        return checks

    #: Whether calls to upstreams are retried. Only the gateway retries: retries at every
    #: hop would multiply (a retry storm) along acquirer -> gateway -> billing.
    retries_upstream = False

    def health_extra(self) -> dict[str, Any]:
        """Figures added to ``/health``: the health score of the upstream links."""
        return {"score": health_score(self.links)}

    def add_link(
        self,
        name: str,
        address: tuple[str, int],
        decode: Callable[[bytes], tuple[Hashable, T]],
        dialect: Dialect[T],
        *,
        backup: tuple[str, int] | None = None,
        on_unmatched: Callable[[bytes, Hashable | None], None] | None = None,
    ) -> Upstream[T]:
        """Create an upstream (pool, breaker, retry), started and stopped with the service.

        ``decode`` maps a response payload to (match key, value) and ``dialect`` speaks the
        link's echo and sign-on: :func:`decode_iso_keyed` and :class:`IsoDialect` for
        ISO-8583 peers, the HSM client's for the HSM. The pool, breaker and retry settings
        are ``upstream_<name>``'s overrides over the common ones.
        """
        s = self.settings.for_upstream(name)
        iso = isinstance(dialect, IsoDialect)
        pool: UpstreamPool[T] = _RecordedPool(
            self.record,
            iso,
            name,
            address,
            _recorded_decode(self.record, name, decode) if iso and self.record.enabled else decode,
            dialect,
            metrics=self.metrics,
            log=self.log,
            config=pool_config(s, self.client_ssl),
            backup=backup,
            kind=s.framing,
            max_frame=s.max_frame,
            on_unmatched=on_unmatched,
        )
        upstream: Upstream[T] = Upstream(
            pool,
            dialect,
            metrics=self.metrics,
            log=self.log,
            breaker=breaker_config(s),
            retry=retry_policy(s) if self.retries_upstream else NO_RETRY,
            retry_deadline=s.retry_deadline,
        )
        self.links.append(upstream)
        return upstream

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Ports] = trio.TASK_STATUS_IGNORED) -> None:
        """Prepare, start links and listeners, report the ports, serve until stopped."""
        await self.prepare()
        async with trio.open_nursery() as nursery:
            for db_thread in self.db_threads:
                await nursery.start(db_thread.run)
            await self.start_background(nursery)
            if self.settings.message_record_file and self.record.enabled:
                nursery.start_soon(self._write_record_file)
            for link in self.links:
                await nursery.start(link.run)
            iso_port = await nursery.start(self._run_server)
            routes = [
                *link_routes(self.links, self.log),
                *record_routes(self.record),
                *self.routes(),
                *self.extra_routes,
            ]
            if self.migrations is not None:
                routes += fault_routes(self.db_fault, self.log)
            app = service_app(
                self.name,
                self.metrics,
                self.health_checks(),
                routes,
                self.log,
                extra=self.health_extra,
                admin_tokens=(self.settings.admin_token_read, self.settings.admin_token_operator),
            )
            s = self.settings
            defaults = default_tokens_in_use(s.admin_token_read, s.admin_token_operator)
            if defaults and not _warned["admin_token_default"]:
                # Once per process: `paylab up` runs four services with the same settings.
                _warned["admin_token_default"] = True
                self.log.warning(
                    "admin_token_default", settings=list(defaults), hint="lab values: change them"
                )
            http_port = await nursery.start(self._run_http, app)
            self.ports = Ports(iso=iso_port, http=http_port)
            self.log.info("service_started", iso_port=iso_port, http_port=http_port)
            task_status.started(self.ports)

    async def _write_record_file(self) -> None:
        """Append the record's new entries to ``data_dir/messages-<service>.jsonl`` once a
        second, and a last time when the service stops (the HTTP listener's stop) or this
        task is cancelled (a stop whose grace ran out): what was recorded is not lost."""
        path = self.settings.data_dir / f"messages-{self.name}.jsonl"
        since = 0
        try:
            while not self._http_stop.is_set():
                with trio.move_on_after(1.0):
                    await self._http_stop.wait()
                since = await self._append_record(path, since)
        finally:
            with trio.CancelScope(shield=True):
                await self._append_record(path, since)

    async def _append_record(self, path: Path, since: int) -> int:
        """Append the entries after ``since`` to ``path``; the new ``since``."""
        entries, newest = self.record.query(Query(since=since, limit=self.record.size or 1))
        if not entries:
            return newest
        try:
            await trio.to_thread.run_sync(_append_text, path, json_lines(entries))
        except OSError as exc:
            self.log.warning("message_record_file_failed", path=str(path), error=str(exc))
        return newest

    async def _run_server(self, *, task_status: trio.TaskStatus[int]) -> None:
        try:
            await self.server.run(task_status=task_status)
        finally:
            self._server_done.set()

    async def _run_http(self, app: Starlette, *, task_status: trio.TaskStatus[int]) -> None:
        try:
            await serve_http(
                app,
                self.settings.host,
                self.settings.http_port(self.name),
                shutdown_trigger=self._http_stop.wait,
                graceful_timeout=self.settings.shutdown_grace,
                task_status=task_status,
            )
        finally:
            self._http_done.set()

    async def stop(self) -> None:
        """Drain and stop: in-flight requests are answered, then everything closes."""
        if self._stopping:
            return
        self._stopping = True
        # Both listeners drain first (HTTP requests too may be waiting on an upstream);
        # only then do the links and the database close under them.
        self.server.shutdown(self.settings.shutdown_grace)
        self._http_stop.set()
        await self._server_done.wait()
        await self._http_done.wait()
        await self.stop_background()
        for link in self.links:
            await link.close()
        # The calls still queued are finished before the engine goes.
        for db_thread in self.db_threads:
            await db_thread.aclose()
        await self.close_resources()
        self.log.info("service_stopped")

    async def close_resources(self) -> None:
        """Release what :meth:`prepare` opened (the database engine)."""
        if self.engine is not None:
            self.engine.dispose()


#: Start-up warnings already given in this process.
_warned = {"admin_token_default": False}


def _append_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


def database_reason(exc: BaseException) -> str:
    """A short, loggable reason of a database failure: the driver's message, without the
    SQL statement and parameters SQLAlchemy adds (they may hold data)."""
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip().splitlines()
    return (text_[0] if text_ else type(exc).__name__)[:200]


def _write_probe(engine: Engine, service: str) -> str | None:
    """A cheap write: rewrite the one row of the service's schema version table
    (``alembic_version_<service>``) with its own value in a write transaction (``BEGIN
    IMMEDIATE`` on SQLite), and commit it. None when it worked, else why not (read-only or
    full disk, lock held too long, database away)."""
    table = f"alembic_version_{service}"
    try:
        with connection_transaction(engine, write=True) as conn:
            conn.execute(text(f'UPDATE "{table}" SET version_num = version_num'))
    except Exception as exc:
        return database_reason(exc)
    return None


async def _link_check(link: Upstream[Any]) -> tuple[bool, str]:
    pool = link.pool
    detail = (
        f"{pool.healthy_count}/{pool.target_connections()} connections healthy, "
        f"breaker {link.breaker.state.value}"
    )
    return link.available, detail


def pool_config(s: Settings, ssl_context: ssl.SSLContext | None = None) -> PoolConfig:
    """The pool sizes and timings of ``s``; ``ssl_context`` makes its links TLS."""
    return PoolConfig(
        ssl_context=ssl_context,
        min_connections=s.pool_min_connections,
        max_connections=max(s.pool_max_connections, s.pool_min_connections),
        max_in_flight=s.max_in_flight_per_connection,
        grow_at=s.pool_grow_at,
        idle_close=s.pool_idle_close,
        heartbeat_interval=s.heartbeat_interval,
        heartbeat_timeout=s.heartbeat_timeout,
        connect_timeout=s.connect_timeout,
        reconnect=Backoff(
            s.reconnect_base_delay,
            2.0,
            max(s.reconnect_max_delay, s.reconnect_base_delay),
            1,
            jitter=True,
        ),
    )


def breaker_config(s: Settings) -> BreakerConfig:
    """The circuit-breaker thresholds of ``s``."""
    return BreakerConfig(
        window_size=s.breaker_window,
        minimum_calls=min(s.breaker_minimum_calls, s.breaker_window),
        failure_rate_threshold=s.breaker_failure_rate,
        consecutive_failures=s.breaker_consecutive_failures,
        slow_call_threshold=s.breaker_slow_call or None,
        open_wait=s.breaker_open_wait,
        half_open_calls=s.breaker_half_open_calls,
        # While open, the link is probed at the pace of the reconnect backoff.
        probe_delay=s.reconnect_base_delay,
        probe_max_delay=max(s.reconnect_max_delay, s.reconnect_base_delay),
    )


def retry_policy(s: Settings) -> Backoff:
    """The retry schedule of ``s`` (1, 2, 4, 8, 16 s by default)."""
    return Backoff(
        s.retry_base_delay,
        s.retry_factor,
        max(s.retry_max_delay, s.retry_base_delay),
        s.retry_max_attempts,
        jitter=s.retry_jitter,
    )


class IsoService(Service):
    """A service whose listener speaks ISO-8583: the decode, validate, answer skeleton.

    Subclasses implement :meth:`dispatch` (a valid request in, the response out) and may
    override :meth:`finish` (e.g. to add a MAC). The skeleton guarantees the wire rules:
    an undecodable frame is logged (never its content) and counted, and gets no answer
    (there is no MTI or STAN to answer to); a decodable but invalid request, including
    one of an MTI paylab does not handle (e.g. 0100), gets its response MTI with field
    39 = 30; a response MTI sent to a server is counted and dropped; a storage failure
    while dispatching (:class:`~shared.db.DatabaseError`, SQLAlchemy's errors) is logged
    and answered 91; the connection stays open in every case.
    """

    #: Financial requests on this listener must carry a MAC (acquirer-to-gateway link).
    require_mac = False

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # One undecodable_frame line per connection per interval: a peer sending garbage
        # is counted frame by frame, but cannot fill the log.
        self._undecodable_log = LogThrottle(settings.undecodable_log_interval, trio.current_time)

    async def handle(self, payload: bytes, peer: str) -> bytes | None:
        start = trio.current_time()
        record = self.record
        try:
            msg = codec.decode(payload)
        except DecodeError as exc:
            if record.enabled:
                record.undecodable("in", peer, len(payload), time.monotonic(), time.time())
            self.metrics.frames_rejected.labels("undecodable").inc()
            held = self._undecodable_log.admit(peer)
            if held is not None:
                self.log.warning(
                    "undecodable_frame",
                    peer=peer,
                    size=len(payload),
                    reason=str(exc)[:200],
                    held_back=held,
                )
            return None
        mti = msg.get("t", "")
        if record.enabled:
            record.iso("in", peer, msg, time.monotonic(), time.time())
        if is_response(mti):
            # A response sent to a server answers nothing of ours; it gets no response.
            self.metrics.frames_rejected.labels("invalid").inc()
            self.log.warning("unexpected_response", peer=peer, mti=mti)
            return None
        self.metrics.in_progress.inc()
        token = current_request.set(key_of(msg))
        try:
            try:
                validate_request(msg, require_mac=self.require_mac)
            except ValidationError as exc:
                self.metrics.frames_rejected.labels("invalid").inc()
                self.log.info(
                    "invalid_request", peer=peer, mti=mti, field=exc.field, reason=str(exc)
                )
                self.log.debug("invalid_request_fields", message=codec.redact(msg))
                response = make_response(msg, RC.FORMAT_ERROR)
            else:
                try:
                    response = await self.dispatch(IsoFrame(payload, msg), peer)
                except (DatabaseError, SQLAlchemyError) as exc:
                    # Nothing could be recorded: "inoperative, try later", never silence.
                    self.log.error("database_unavailable", mti=mti, error=database_reason(exc))
                    response = make_response(msg, RC.ISSUER_INOPERATIVE)
            response = await self.finish(msg, response)
            out = codec.encode(response)
        finally:
            self.metrics.in_progress.dec()
            current_request.reset(token)
        if record.enabled:
            record.iso("out", peer, response, time.monotonic(), time.time())
        self.metrics.requests_of(mti, response.get("39", "--")).inc()
        self.metrics.duration_of(mti).observe(trio.current_time() - start)
        return out

    async def dispatch(self, frame: IsoFrame, peer: str) -> Message:
        """Answer one valid request."""
        raise NotImplementedError

    async def finish(self, request: Message, response: Message) -> Message:
        """Last step before encoding (the gateway adds its MAC here)."""
        return response


def _hsm_code(payload: bytes) -> tuple[str, str]:
    """(header, command code) of an HSM command: its first 4 and next 2 characters."""
    return payload[:4].decode("ascii", "replace"), payload[4:6].decode("ascii", "replace")


def _recorded_decode(
    record: MessageRecord,
    link: str,
    decode: Callable[[bytes], tuple[Hashable, T]],
) -> Callable[[bytes], tuple[Hashable, T]]:
    """``decode`` of an ISO link that also records every answer arriving on ``link``, late
    ones too (echo answers are left out: the pool sends echoes outside the record)."""

    def recorded(payload: bytes) -> tuple[Hashable, T]:
        try:
            key, value = decode(payload)
        except DecodeError:
            record.undecodable("in", link, len(payload), time.monotonic(), time.time())
            raise
        msg = getattr(value, "msg", None)
        if msg is not None and not msg.get("t", "").startswith("08"):
            record.iso("in", link, msg, time.monotonic(), time.time())
        return key, value

    return recorded


def _failure_note(exc: UpstreamError) -> str:
    """The record's note on a request whose call failed with ``exc``."""
    if isinstance(exc, UpstreamTimeout):
        return "no answer in time"
    if isinstance(exc, UpstreamUnavailable):
        return "sent, link broke" if exc.sent else f"not sent: {exc}"
    return str(exc)


class _RecordedPool(UpstreamPool[T]):
    """A pool that records every request it sends (each attempt: retries are their own
    entries), tagged with the request being handled for HSM commands."""

    def __init__(self, record: MessageRecord, iso: bool, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._record = record
        self._iso = iso

    async def call(self, payload: bytes, key: Hashable, timeout: float) -> T:
        record = self._record
        if not record.enabled:
            return await super().call(payload, key, timeout)
        mono, wall = time.monotonic(), time.time()
        note = ""
        try:
            result = await super().call(payload, key, timeout)
        except UpstreamError as exc:
            note = _failure_note(exc)
            raise
        finally:
            self._record_sent(payload, mono, wall, note)
        if not self._iso:  # the HSM's answer, tagged like its command (ISO: see decode)
            self._record_hsm_answer(result)
        return result

    async def call_many(
        self, requests: Sequence[tuple[bytes, Hashable]], timeout: float
    ) -> list[T]:
        record = self._record
        if not record.enabled:
            return await super().call_many(requests, timeout)
        mono, wall = time.monotonic(), time.time()
        note = ""
        try:
            results = await super().call_many(requests, timeout)
        except UpstreamError as exc:
            note = _failure_note(exc)
            raise
        finally:
            for payload, _key in requests:
                self._record_sent(payload, mono, wall, note)
        if not self._iso:
            for result in results:
                self._record_hsm_answer(result)
        return results

    def _record_hsm_answer(self, result: object) -> None:
        """The HSM's answer, tagged like its command with the request being handled."""
        self._record.hsm(
            "in",
            self.name,
            str(getattr(result, "header", "")),
            str(getattr(result, "code", "")),
            str(getattr(result, "error", "")),
            time.monotonic(),
            time.time(),
            current_request.get(),
        )

    def _record_sent(self, payload: bytes, mono: float, wall: float, note: str) -> None:
        if self._iso:
            kept = _encoded.get()
            if kept is not None and kept[0] is payload:
                msg = kept[1]  # encoded by encode_upstream: what decoding would give
            else:
                try:
                    msg = codec.decode(payload)
                except DecodeError:
                    self._record.undecodable("out", self.name, len(payload), mono, wall)
                    return
            self._record.iso("out", self.name, msg, mono, wall, note=note)
        else:
            header, command = _hsm_code(payload)
            self._record.hsm(
                "out", self.name, header, command, "", mono, wall, current_request.get(), note=note
            )
