"""Fault injection on the wire: TCP proxies between the services, and their controller.

:class:`ChaosProxy` listens in front of one service's ISO port and forwards every byte to
it, applying the link's :class:`shared.lab.faults.Faults` chunk by chunk (the decisions are
:func:`shared.lab.faults.plan` and :class:`shared.lab.faults.Pacer`; this module only moves
bytes). :class:`ChaosController` holds the proxies by link name (``gateway``: acquirer ->
gateway, ``billing``: gateway -> billing, ``hsm``: gateway and billing -> HSM), switches the
services' database faults, runs connection floods, and serves the HTTP API on
``settings.chaos_http_port`` (see ``docs/chaos.md``). :func:`flood` opens many idle TCP
connections against a listener and holds them.

What a fault looks like on the wire:

* latency/jitter: each chunk is held, order is kept (a later chunk never overtakes);
* blackhole: chunks are read and discarded, the connection stays open (a silent link); at
  1.0 (:meth:`ChaosProxy.partition`) new connections are accepted but never connected on
  to the target, as a TCP handshake lost in a partition would never complete upstream;
* reset: both sides are closed with SO_LINGER 0 (a TCP RST);
* close_after: the connection is closed (FIN) once that many bytes crossed one direction;
* bandwidth: each direction is paced to that many bytes per second.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import trio
from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shared.errors import PaylabError
from shared.lab.faults import NONE, Faults, FaultSpecError, Pacer, plan
from shared.ops.log import get_logger
from shared.ops.metrics import ServiceMetrics
from shared.ops.settings import Settings
from shared.server.auth import actor_of, audit, audit_stream
from shared.server.http import json_error, serve_http, service_app
from shared.store.db import DatabaseFault

__all__ = [
    "LINKS",
    "ChaosController",
    "ChaosMetrics",
    "ChaosProxy",
    "FloodResult",
    "UnknownLink",
    "flood",
]

#: The proxied links, by name, and the service each one stands in front of.
LINKS: Final = ("gateway", "billing", "hsm")
#: Largest chunk read at a time from one side of a proxied connection.
CHUNK: Final = 64 * 1024
#: Chunks read ahead of the writer per direction (bounds the proxy's memory per connection).
QUEUE_DEPTH: Final = 64
#: Seconds to wait for the target's TCP handshake before giving the client up.
CONNECT_TIMEOUT: Final = 5.0


class UnknownLink(PaylabError, LookupError):
    """No proxied link (or service) of that name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.known = sorted(known)
        super().__init__(f"no link named {name!r} (known: {', '.join(self.known) or 'none'})")


def _address(host: str, port: int) -> str:
    return f"{host}:{port}"


def _rst(stream: trio.SocketStream) -> None:
    """Make the coming close a TCP reset: SO_LINGER on with a zero timeout."""
    with contextlib.suppress(OSError):  # already gone: nothing to reset
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class ChaosMetrics:
    """The controller's metrics, one series per link."""

    def __init__(self, registry: Any) -> None:
        self.faults_active = Gauge(
            "paylab_chaos_faults_active",
            "1 while any fault is set on the link, else 0.",
            ["link"],
            registry=registry,
        )
        self.bytes_dropped = Counter(
            "paylab_chaos_bytes_dropped",
            "Bytes read by the chaos proxy and discarded (blackhole, partition).",
            ["link"],
            registry=registry,
        )
        self.resets = Counter(
            "paylab_chaos_resets",
            "Connections reset (RST) by the chaos proxy.",
            ["link"],
            registry=registry,
        )


@dataclass(eq=False)
class _Conn:
    """One proxied connection: its scope (cancel to end it), and what happened on it."""

    client: trio.SocketStream
    upstream: trio.SocketStream | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: bool = False
    reset: bool = False

    def abort(self, *, rst: bool) -> None:
        """End the connection now; with ``rst`` both sides see a reset."""
        if rst:
            self.reset = True
        self.scope.cancel()


class ChaosProxy:
    """A TCP proxy in front of ``target`` applying :attr:`faults` to every chunk.

    Contract: :meth:`run` listens on ``host:port`` (0: ephemeral), reports the bound port
    through ``task_status`` and in :attr:`port`, and serves until :meth:`close` or
    cancellation. Each accepted connection opens its own connection to the target (a
    refused target closes the client at once) and pumps both directions in a task of the
    proxy's nursery; a peer's error ends that connection only, never the proxy. Faults may
    be changed at any time (:meth:`set_faults`, :meth:`partition`, :meth:`heal`) and apply
    to the next chunk of every connection.
    """

    def __init__(
        self,
        name: str,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults = NONE,
        rng: random.Random | None = None,
        metrics: ChaosMetrics | None = None,
        log: Any = None,
    ) -> None:
        self.name = name
        self.target = target
        self.host = host
        self.port = port
        self.faults = faults
        self.rng = rng or random.Random()
        self._metrics = metrics
        self._log = log or get_logger("chaos")
        self._conns: set[_Conn] = set()
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self.connections_total = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_dropped = 0
        self.resets = 0
        self.closes = 0
        self._publish()

    # -- faults -------------------------------------------------------------------------------
    @property
    def partitioned(self) -> bool:
        return self.faults.blackhole >= 1.0

    def set_faults(self, faults: Faults) -> None:
        """Apply ``faults`` from the next chunk on."""
        self.faults = faults
        self._publish()

    def partition(self) -> None:
        """Drop every byte both ways, and connect new clients to nothing."""
        self.set_faults(self.faults.merge({"blackhole": 1.0}))

    def heal(self) -> int:
        """Clear every fault and abort the connections whose byte stream was corrupted by
        dropped chunks (or never reached the target); returns how many were aborted. The
        services' pools notice the closed connections and reconnect through the proxy."""
        self.set_faults(NONE)
        aborted = 0
        for conn in list(self._conns):
            if conn.dropped or conn.upstream is None:
                conn.abort(rst=False)
                aborted += 1
        return aborted

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.faults_active.labels(self.name).set(1 if self.faults.active else 0)

    # -- serving ------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the port, serve until :meth:`close` (see the class contract)."""
        try:
            with self._scope:
                listeners = await trio.open_tcp_listeners(self.port, host=self.host)
                self.port = int(listeners[0].socket.getsockname()[1])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        # Connection tasks live in the same nursery, ended by the scope.
                        lambda: trio.serve_listeners(
                            self._handle, listeners, handler_nursery=nursery
                        )
                    )
                    task_status.started(self.port)
        finally:
            self._done.set()

    async def close(self) -> None:
        """Stop listening and end every connection; returns when all are closed."""
        self._scope.cancel()
        await self._done.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = _Conn(client)
        self.connections_total += 1
        self._conns.add(conn)
        try:
            with conn.scope:
                if self.partitioned:
                    # A partition: the handshake would never reach the target.
                    await self._swallow(conn, client)
                    return
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        conn.upstream = await trio.open_tcp_stream(*self.target)
                except (OSError, trio.TooSlowError):
                    # Target down: the client sees its connection closed at once.
                    self.closes += 1
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, conn, client, conn.upstream, "up")
                    nursery.start_soon(self._direction, conn, conn.upstream, client, "down")
        finally:
            self._conns.discard(conn)
            for stream in (client, conn.upstream):
                if stream is None:
                    continue
                if conn.reset:
                    _rst(stream)
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _swallow(self, conn: _Conn, client: trio.SocketStream) -> None:
        """Read and discard until the client goes away or the connection is aborted."""
        try:
            while data := await client.receive_some(CHUNK):
                self._dropped(conn, len(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _dropped(self, conn: _Conn, n: int) -> None:
        conn.dropped = True
        self.bytes_dropped += n
        if self._metrics is not None:
            self._metrics.bytes_dropped.labels(self.name).inc(n)

    async def _direction(
        self, conn: _Conn, src: trio.SocketStream, dst: trio.SocketStream, direction: str
    ) -> None:
        """One direction: a reader that plans each chunk, a writer that delivers in order."""
        send, receive = trio.open_memory_channel[tuple[float, bytes, str]](QUEUE_DEPTH)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guard, conn, self._writer(conn, receive, dst, direction))
            await self._guard(conn, self._reader(conn, src, send))

    @staticmethod
    async def _guard(conn: _Conn, work: Awaitable[None]) -> None:
        """Run ``work``; a peer's error ends this connection, never the proxy."""
        try:
            await work
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            conn.abort(rst=False)

    async def _reader(
        self,
        conn: _Conn,
        src: trio.SocketStream,
        send: trio.MemorySendChannel[tuple[float, bytes, str]],
    ) -> None:
        """Read chunks and queue (deliver-at, bytes, then) for the writer; ``then`` is
        ``""``, ``"close"`` or ``"eof"``."""
        forwarded = 0
        pacer = Pacer(self.faults.bandwidth, trio.current_time())
        last_at = 0.0
        async with send:
            while True:
                data = await src.receive_some(CHUNK)
                if not data:
                    await send.send((last_at, b"", "eof"))
                    return
                faults = self.faults
                p = plan(faults, self.rng, forwarded, len(data))
                if p.reset:
                    self.resets += 1
                    if self._metrics is not None:
                        self._metrics.resets.labels(self.name).inc()
                    self._log.info("chaos_reset", link=self.name)
                    conn.abort(rst=True)
                    return
                if p.drop:
                    self._dropped(conn, len(data))
                    continue
                if pacer.rate != faults.bandwidth:
                    pacer = Pacer(faults.bandwidth, trio.current_time())
                now = trio.current_time()
                chunk = data[: p.deliver]
                # Order is kept: a chunk never leaves before the one read ahead of it.
                last_at = max(last_at, now + p.delay + pacer.delay(now, len(chunk)))
                forwarded += len(chunk)
                if p.close:
                    await send.send((last_at, chunk, "close"))
                    return
                await send.send((last_at, chunk, ""))

    async def _writer(
        self,
        conn: _Conn,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes, str]],
        dst: trio.SocketStream,
        direction: str,
    ) -> None:
        async with receive:
            async for at, chunk, then in receive:
                await trio.sleep_until(at)
                if chunk:
                    await dst.send_all(chunk)
                    if direction == "up":
                        self.bytes_up += len(chunk)
                    else:
                        self.bytes_down += len(chunk)
                if then == "close":
                    self.closes += 1
                    conn.abort(rst=False)
                    return
                if then == "eof":
                    # A half-close passes on: the other direction may still carry answers.
                    try:
                        await dst.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        conn.abort(rst=False)
                    return

    # -- views --------------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """The proxy's state as JSON (see ``docs/chaos.md``)."""
        return {
            "name": self.name,
            "listen": _address(self.host, self.port),
            "target": _address(*self.target),
            "faults": self.faults.as_dict(),
            "partitioned": self.partitioned,
            "connections": len(self._conns),
            "connections_total": self.connections_total,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_dropped": self.bytes_dropped,
            "resets": self.resets,
            "closes": self.closes,
        }


# -- floods ----------------------------------------------------------------------------------


@dataclass
class FloodResult:
    """What a flood did: connections asked for, opened, refused at connect, closed by the
    server while held (a connection cap or idle timeout at work), and whether it still runs."""

    target: str
    address: str
    connections: int
    hold: float
    opened: int = 0
    refused: int = 0
    closed_by_server: int = 0
    running: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def flood(
    host: str,
    port: int,
    connections: int,
    hold: float,
    *,
    source: str | None = None,
    target: str = "",
    result: FloodResult | None = None,
) -> FloodResult:
    """Open up to ``connections`` idle TCP connections to ``host:port`` (from the local
    address ``source`` when given: another 127.x address keeps a per-source connection cap
    away from other local clients), hold them ``hold`` seconds, then close them all.

    ``result`` (updated as the flood goes) lets a caller watch a flood in progress. Never
    raises for network errors: they are counted.
    """
    res = result or FloodResult(target, _address(host, port), connections, hold)
    streams: list[trio.SocketStream] = []

    async def watch(stream: trio.SocketStream) -> None:
        # An idle client reads nothing; end of stream or a reset means the server closed it.
        try:
            while await stream.receive_some(CHUNK):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        res.closed_by_server += 1

    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(hold):
                for _ in range(connections):
                    try:
                        with trio.fail_after(CONNECT_TIMEOUT):
                            stream = await trio.open_tcp_stream(host, port, local_address=source)
                    except (OSError, trio.TooSlowError):
                        res.refused += 1
                        continue
                    streams.append(stream)
                    res.opened += 1
                    nursery.start_soon(watch, stream)
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for stream in streams:
                await stream.aclose()
        res.running = False
    return res


# -- the controller --------------------------------------------------------------------------


class ChaosController:
    """The proxies of a network by link name, the services' database switches, floods,
    and the HTTP API over them (see ``docs/chaos.md``).

    ``databases`` maps a service name to its :class:`shared.store.db.DatabaseFault` (the switch
    is called directly: the controller runs in the services' process); ``iso_targets``
    maps a service name to the ``(host, port)`` of its real ISO listener (flood targets).
    Every action is logged and written to the audit stream.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        databases: Mapping[str, DatabaseFault] | None = None,
        iso_targets: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        self.settings = settings
        self.log = get_logger("chaos")
        self._audit = audit_stream(self.log)
        self.metrics = ServiceMetrics("chaos")
        self.chaos_metrics = ChaosMetrics(self.metrics.registry)
        self.proxies: dict[str, ChaosProxy] = {}
        self.databases: dict[str, DatabaseFault] = dict(databases or {})
        self.iso_targets: dict[str, tuple[str, int]] = dict(iso_targets or {})
        self.last_flood: FloodResult | None = None
        self.port: int | None = None
        self._nursery: trio.Nursery | None = None
        self._http_stop = trio.Event()
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    # -- proxies ------------------------------------------------------------------------------
    def proxy(self, name: str, target: tuple[str, int], **kwargs: Any) -> ChaosProxy:
        """A new proxy for link ``name`` (the caller runs it), registered here."""
        proxy = ChaosProxy(
            name,
            target,
            host=self.settings.host,
            metrics=self.chaos_metrics,
            log=self.log,
            **kwargs,
        )
        self.proxies[name] = proxy
        return proxy

    def _links(self, link: str, *, allow_all: bool) -> list[ChaosProxy]:
        if allow_all and link == "all":
            return list(self.proxies.values())
        proxy = self.proxies.get(link)
        if proxy is None:
            raise UnknownLink(link, [*self.proxies, *(["all"] if allow_all else [])])
        return [proxy]

    def set(
        self, link: str, faults: Faults | dict[str, Any], *, actor: str = "api"
    ) -> dict[str, Any]:
        """Merge ``faults`` into the link's faults; returns the link's view.

        Raises :class:`UnknownLink` or :class:`shared.lab.faults.FaultSpecError`.
        """
        (proxy,) = self._links(link, allow_all=False)
        new = proxy.faults.merge(faults)
        proxy.set_faults(new)
        self._record("chaos_fault_set", "chaos.set", link, actor, faults=new.as_dict())
        return proxy.view()

    def partition(self, link: str, *, actor: str = "api") -> list[dict[str, Any]]:
        """Partition ``link`` (or ``all``); returns the views."""
        proxies = self._links(link, allow_all=True)
        for proxy in proxies:
            proxy.partition()
        self._record("chaos_partition", "chaos.partition", link, actor)
        return [p.view() for p in proxies]

    def heal(self, link: str, *, actor: str = "api") -> list[dict[str, Any]]:
        """Clear the faults of ``link`` (or ``all``), aborting corrupted connections."""
        proxies = self._links(link, allow_all=True)
        aborted = sum(p.heal() for p in proxies)
        self._record("chaos_heal", "chaos.heal", link, actor, aborted=aborted)
        return [p.view() for p in proxies]

    def status(self) -> list[dict[str, Any]]:
        return [p.view() for p in self.proxies.values()]

    # -- database faults ---------------------------------------------------------------------
    def database(self, service: str, down: bool, *, actor: str = "api") -> dict[str, Any]:
        """Make ``service``'s database unavailable (``down``) or available again."""
        fault = self.databases.get(service)
        if fault is None:
            raise UnknownLink(service, self.databases)
        fault.set_down(down)
        self._record("chaos_database_fault", "chaos.database", service, actor, down=down)
        return fault.view()

    def database_view(self) -> dict[str, Any]:
        return {name: fault.view() for name, fault in self.databases.items()}

    # -- floods -------------------------------------------------------------------------------
    def start_flood(
        self,
        target: str,
        connections: int,
        hold: float,
        *,
        source: str | None = None,
        actor: str = "api",
    ) -> FloodResult:
        """Start a flood against ``target``'s ISO listener in the background."""
        address = self.iso_targets.get(target)
        if address is None:
            raise UnknownLink(target, self.iso_targets)
        if self._nursery is None:
            raise PaylabError("the chaos controller is not running")
        result = FloodResult(target, _address(*address), connections, hold)
        self.last_flood = result
        self._nursery.start_soon(
            lambda: flood(
                address[0],
                address[1],
                connections,
                hold,
                source=source,
                target=target,
                result=result,
            )
        )
        self._record(
            "chaos_flood", "chaos.flood", target, actor, connections=connections, hold=hold
        )
        return result

    def _record(self, event: str, action: str, target: str, actor: str, **extra: Any) -> None:
        self.log.warning(event, link=target, **extra)
        audit(self._audit, event, actor=actor, action=action, target=target, outcome="ok", **extra)

    def view(self) -> dict[str, Any]:
        """``GET /chaos``: links, database switches, the last flood."""
        return {
            "links": self.status(),
            "database": self.database_view(),
            "flood": None if self.last_flood is None else self.last_flood.as_dict(),
        }

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the HTTP API on ``settings.chaos_http_port`` and host the floods; report
        the HTTP port; return after :meth:`close`."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with self._scope:
                    app = service_app(
                        "chaos",
                        self.metrics,
                        routes=self.routes(),
                        log=self.log,
                        admin_tokens=(
                            self.settings.admin_token_read,
                            self.settings.admin_token_operator,
                        ),
                    )
                    self.port = await nursery.start(
                        lambda task_status: serve_http(
                            app,
                            self.settings.host,
                            self.settings.chaos_http_port,
                            shutdown_trigger=self._http_stop.wait,
                            graceful_timeout=self.settings.shutdown_grace,
                            task_status=task_status,
                        )
                    )
                    task_status.started(self.port)
                    await self._http_stop.wait()
                    # Floods end with the controller.
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._done.set()

    async def close(self) -> None:
        """Stop the HTTP server, the floods and every proxy."""
        self._http_stop.set()
        for proxy in self.proxies.values():
            await proxy.close()
        await self._done.wait()

    # -- HTTP ---------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        """``GET /chaos`` and the ``POST /chaos/...`` actions (see ``docs/chaos.md``)."""

        async def body_of(request: Request) -> dict[str, Any] | Response:
            raw = await request.body()
            if not raw.strip():
                return {}
            try:
                data = await request.json()
            except ValueError:
                return json_error(400, "the body is not JSON")
            if not isinstance(data, dict):
                return json_error(400, "the body must be a JSON object")
            return data

        def guarded(fn: Callable[[Request, dict[str, Any]], Any]) -> Callable[..., Any]:
            async def endpoint(request: Request) -> Response:
                body = await body_of(request)
                if isinstance(body, Response):
                    return body
                try:
                    return JSONResponse(fn(request, body))
                except UnknownLink as exc:
                    return json_error(404, str(exc), known=exc.known)
                except FaultSpecError as exc:
                    return json_error(400, str(exc))

            return endpoint

        async def get_chaos(_request: Request) -> Response:
            return JSONResponse(self.view())

        def set_link(request: Request, body: dict[str, Any]) -> Any:
            return self.set(request.path_params["link"], body, actor=actor_of(request))

        def partition(request: Request, _body: dict[str, Any]) -> Any:
            return self.partition(request.path_params["link"], actor=actor_of(request))

        def heal(request: Request, _body: dict[str, Any]) -> Any:
            return self.heal(request.path_params["link"], actor=actor_of(request))

        def database(request: Request, body: dict[str, Any]) -> Any:
            down = body.get("down")
            if not isinstance(down, bool):
                raise FaultSpecError('the body must be {"down": true} or {"down": false}')
            return self.database(request.path_params["service"], down, actor=actor_of(request))

        async def start_flood(request: Request) -> Response:
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            try:
                target, connections, hold, source = _flood_spec(body)
                result = self.start_flood(
                    target, connections, hold, source=source, actor=actor_of(request)
                )
            except UnknownLink as exc:
                return json_error(404, str(exc), known=exc.known)
            except FaultSpecError as exc:
                return json_error(400, str(exc))
            return JSONResponse({"flood": result.as_dict()}, status_code=202)

        return [
            Route("/chaos", get_chaos, methods=["GET"]),
            # Fixed paths first: "database" and "flood" are not link names.
            Route("/chaos/database/{service}", guarded(database), methods=["POST"]),
            Route("/chaos/flood", start_flood, methods=["POST"]),
            Route("/chaos/{link}/partition", guarded(partition), methods=["POST"]),
            Route("/chaos/{link}/heal", guarded(heal), methods=["POST"]),
            Route("/chaos/{link}", guarded(set_link), methods=["POST"]),
        ]


#: Largest flood accepted through the API (each connection is a file descriptor here too).
MAX_FLOOD: Final = 10_000
#: Longest hold accepted through the API, in seconds.
MAX_HOLD: Final = 3600.0


def _flood_spec(body: dict[str, Any]) -> tuple[str, int, float, str | None]:
    """(target, connections, hold, source) from a flood request body, validated."""
    from shared.lab.faults import parse_duration

    unknown = sorted(set(body) - {"target", "connections", "hold", "source"})
    if unknown:
        raise FaultSpecError(f"unknown flood key(s): {', '.join(unknown)}")
    target = body.get("target")
    if not isinstance(target, str) or not target:
        raise FaultSpecError("target (a service name) is required")
    connections = body.get("connections", 100)
    if isinstance(connections, bool) or not isinstance(connections, int):
        raise FaultSpecError(f"connections must be an integer, got {connections!r}")
    if not 1 <= connections <= MAX_FLOOD:
        raise FaultSpecError(f"connections must lie in [1, {MAX_FLOOD}], got {connections}")
    hold = parse_duration(body.get("hold", 10.0))
    if not (math.isfinite(hold) and hold <= MAX_HOLD):
        raise FaultSpecError(f"hold must be at most {MAX_HOLD:g} s, got {hold!r}")
    source = body.get("source")
    if source is not None and not isinstance(source, str):
        raise FaultSpecError("source must be a local IP address")
    return target, connections, hold, source
