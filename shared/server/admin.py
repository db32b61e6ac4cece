"""Operator endpoints every service with upstream links offers on its HTTP port.

``GET /links`` and ``GET /breakers`` show the pools and circuit breakers;
``POST /breakers/{name}/reset|force-open|disable`` and ``POST /links/{name}/reconnect``
act on them. Every answer is JSON; an unknown name is a 404 with a JSON message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shared.net.upstream import Upstream
from shared.server.auth import actor_of, audit, audit_stream
from shared.server.http import json_error

#: Operator actions on a breaker: the path word and the method it calls.
BREAKER_ACTIONS: dict[str, Callable[[Upstream[Any]], None]] = {
    "reset": Upstream.reset_breaker,
    "force-open": Upstream.force_open_breaker,
    "disable": Upstream.disable_breaker,
}


def health_score(links: Sequence[Upstream[Any]]) -> int:
    """0-100: the mean over upstreams of healthy connections over the target number, an
    upstream whose breaker refuses calls counting 0. 100 with no upstreams at all."""
    if not links:
        return 100
    parts = []
    for link in links:
        pool = link.pool
        target = max(pool.target_connections(), 1)
        parts.append(0.0 if not link.breaker_allows else min(pool.healthy_count / target, 1.0))
    return round(100 * sum(parts) / len(parts))


def link_routes(links: Sequence[Upstream[Any]], log: Any) -> list[BaseRoute]:
    """The routes above, over ``links``."""
    by_name = {link.name: link for link in links}
    audit_log = audit_stream(log)

    def find(request: Request) -> Upstream[Any] | None:
        return by_name.get(request.path_params["name"])

    def unknown(request: Request) -> Response:
        names = ", ".join(sorted(by_name)) or "none"
        return json_error(404, f"no upstream named {request.path_params['name']!r} ({names})")

    async def list_links(_request: Request) -> Response:
        return JSONResponse(
            {"score": health_score(links), "links": [link.link_view() for link in links]}
        )

    async def list_breakers(_request: Request) -> Response:
        return JSONResponse({"breakers": [link.breaker_view() for link in links]})

    async def breaker_action(request: Request) -> Response:
        link = find(request)
        if link is None:
            return unknown(request)
        action = request.path_params["action"]
        act = BREAKER_ACTIONS.get(action)
        if act is None:
            return json_error(404, f"no breaker action {action!r} ({', '.join(BREAKER_ACTIONS)})")
        act(link)
        log.warning("breaker_operator_action", upstream=link.name, action=action)
        audit(
            audit_log,
            "breaker_operator_action",
            actor=actor_of(request),
            action=f"breaker.{action}",
            target=link.name,
            outcome="ok",
            state=link.breaker_view().get("state"),
        )
        return JSONResponse(link.breaker_view())

    async def reconnect(request: Request) -> Response:
        link = find(request)
        if link is None:
            return unknown(request)
        dropped = link.pool.reconnect()
        audit(
            audit_log,
            "link_reconnect",
            actor=actor_of(request),
            action="link.reconnect",
            target=link.name,
            outcome="ok",
            dropped=dropped,
        )
        return JSONResponse({"name": link.name, "dropped": dropped, "link": link.link_view()})

    return [
        Route("/links", list_links, methods=["GET"]),
        Route("/breakers", list_breakers, methods=["GET"]),
        Route("/breakers/{name}/{action}", breaker_action, methods=["POST"]),
        Route("/links/{name}/reconnect", reconnect, methods=["POST"]),
    ]
