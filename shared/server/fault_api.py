"""A service's database switch over its own HTTP port: ``GET /faults`` and
``POST /faults/database``.

Every service with a database serves these routes (the operator token changes the switch,
see :mod:`shared.server.auth`); the switch itself is :class:`shared.store.db.DatabaseFault`.
The chaos controller (:mod:`shared.lab.chaos.controller`) runs in the services' process and
calls the switch directly; see ``docs/chaos.md``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shared.server.auth import actor_of, audit, audit_stream
from shared.server.http import json_error
from shared.store.db import DatabaseFault


def fault_routes(fault: DatabaseFault, log: Any) -> list[BaseRoute]:
    """``GET /faults`` and ``POST /faults/database`` (body ``{"down": bool}``) over a
    service's database switch; every change is logged and audited."""
    audit_log = audit_stream(log)

    async def get_faults(_request: Request) -> Response:
        return JSONResponse({"database": fault.view()})

    async def set_database(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return json_error(400, "the body is not JSON")
        down = body.get("down") if isinstance(body, dict) else None
        if not isinstance(down, bool):
            return json_error(400, 'the body must be {"down": true} or {"down": false}')
        fault.set_down(down)
        log.warning("chaos_database_fault", down=down)
        audit(
            audit_log,
            "chaos_database_fault",
            actor=actor_of(request),
            action="faults.database",
            target="database",
            outcome="ok",
            down=down,
        )
        return JSONResponse({"database": fault.view()})

    return [
        Route("/faults", get_faults, methods=["GET"]),
        Route("/faults/database", set_database, methods=["POST"]),
    ]
