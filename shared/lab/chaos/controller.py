"""The chaos controller: the proxies of a network by link name, the services' database
switches, connection floods, and the HTTP API over them.

:class:`ChaosController` holds one :class:`~shared.lab.chaos.proxy.ChaosProxy` per link
(``gateway``: acquirer -> gateway, ``billing``: gateway -> billing, ``hsm``: gateway and
billing -> HSM), switches the services' database faults, starts floods
(:func:`shared.lab.chaos.flood.flood`), and serves the HTTP API on
``settings.chaos_http_port`` (see ``docs/chaos.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shared.errors import PaylabError
from shared.lab.chaos.faults import Faults, FaultSpecError
from shared.lab.chaos.flood import FloodResult, flood
from shared.lab.chaos.proxy import ChaosMetrics, ChaosProxy, host_port
from shared.ops.log import get_logger
from shared.ops.metrics import ServiceMetrics
from shared.ops.settings import Settings
from shared.server.auth import actor_of, audit, audit_stream
from shared.server.http import json_error, serve_http, service_app
from shared.store.db import DatabaseFault

#: The proxied links, by name, and the service each one stands in front of.
LINKS: Final = ("gateway", "billing", "hsm")


class UnknownLink(PaylabError, LookupError):
    """No proxied link (or service) of that name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.known = sorted(known)
        super().__init__(f"no link named {name!r} (known: {', '.join(self.known) or 'none'})")


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

        Raises :class:`UnknownLink` or :class:`shared.lab.chaos.faults.FaultSpecError`.
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
        result = FloodResult(target, host_port(*address), connections, hold)
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
    from shared.lab.chaos.faults import parse_duration

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
