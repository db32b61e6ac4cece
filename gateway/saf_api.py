"""The operators' HTTP API of the store-and-forward queue (on the gateway's HTTP port).

* ``GET /saf?state=dead&limit=50&before_id=123&rrn=...&stan=...``: entries, newest first,
  with ``next_before_id`` for the next page;
* ``GET /saf/stats``: counts by state, depth, oldest entry's age;
* ``GET /saf/{id}``: one entry;
* ``POST /saf/{id}/retry``: a dead entry back to the queue, due now;
* ``POST /saf/{id}/cancel``: never forwarded afterwards;
* ``POST /saf/purge?older_than=SECONDS``: delete done and cancelled entries older than that
  (default ``saf_retention``).

Entries show the masked PAN only; the queued message itself is never shown. Errors are
JSON: 400 for a bad parameter, 404 for an unknown id, 409 for a change the entry's state
does not allow.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.metrics import SafMetrics
from gateway.saf_rules import SafState, SafTransitionError
from gateway.saf_store import SafStore
from shared.server.auth import actor_of, audit, audit_stream
from shared.server.http import json_error

RunDb = Callable[..., Awaitable[Any]]
Handler = Callable[[Request, SafStore], Awaitable[Response]]


class _BadParam(Exception):
    pass


def _int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadParam(f"{name} must be a whole number") from None
    if not lo <= value <= hi:
        raise _BadParam(f"{name} must be between {lo} and {hi}")
    return value


def saf_routes(
    store: Callable[[], SafStore | None],
    run_db: RunDb,
    metrics: SafMetrics,
    log: Any,
    retention: float,
) -> list[BaseRoute]:
    """The routes above; ``store()`` is None until the database is open (503)."""
    audit_log = audit_stream(log)

    async def guarded(fn: Handler, request: Request) -> Response:
        saf = store()
        if saf is None:
            return json_error(503, "queue not open")
        try:
            return await fn(request, saf)
        except _BadParam as exc:
            return json_error(400, str(exc))

    async def list_entries(request: Request, saf: SafStore) -> Response:
        state_name = request.query_params.get("state")
        state: SafState | None = None
        if state_name:
            try:
                state = SafState(state_name)
            except ValueError:
                names = ", ".join(s.value for s in SafState)
                raise _BadParam(f"state must be one of {names}") from None
        limit = _int_param(request, "limit", 50, 1, 1000) or 50
        before = _int_param(request, "before_id", None, 1, 2**62)
        rrn = request.query_params.get("rrn") or None
        stan = request.query_params.get("stan") or None
        items = await run_db(
            lambda: saf.list(state=state, limit=limit, before_id=before, rrn=rrn, stan=stan)
        )
        next_before = items[-1].id if len(items) == limit else None
        return JSONResponse({"items": [v.as_dict() for v in items], "next_before_id": next_before})

    async def stats(_request: Request, saf: SafStore) -> Response:
        result = await run_db(lambda: saf.stats(now=datetime.now(UTC)))
        return JSONResponse(result.as_dict())

    def entry_id(request: Request) -> int:
        try:
            return int(request.path_params["entry_id"])
        except ValueError:
            raise _BadParam("entry id must be a whole number") from None

    async def show(request: Request, saf: SafStore) -> Response:
        view = await run_db(saf.get, entry_id(request))
        if view is None:
            return json_error(404, f"no queue entry {request.path_params['entry_id']}")
        return JSONResponse(view.as_dict())

    async def change(request: Request, saf: SafStore) -> Response:
        action = request.path_params["action"]
        ident = entry_id(request)
        act = {"retry": saf.retry, "cancel": saf.cancel}.get(action)
        if act is None:
            return json_error(404, f"no queue action {action!r} (retry, cancel)")
        try:
            view = await run_db(lambda: act(ident, now=datetime.now(UTC)))
        except LookupError:
            return json_error(404, f"no queue entry {ident}")
        except SafTransitionError as exc:
            return json_error(409, str(exc))
        metrics.operator.labels(action).inc()
        log.warning("saf_operator_action", action=action, entry=ident, state=view.state.value)
        audit(
            audit_log,
            "saf_operator_action",
            actor=actor_of(request),
            action=f"saf.{action}",
            target=f"saf/{ident}",
            outcome="ok",
            state=view.state.value,
        )
        return JSONResponse(view.as_dict())

    async def purge(request: Request, saf: SafStore) -> Response:
        age = _int_param(request, "older_than", int(retention), 0, 10 * 365 * 86_400)
        cutoff = datetime.now(UTC) - timedelta(seconds=age or 0)
        removed = await run_db(lambda: saf.purge(older_than=cutoff))
        metrics.operator.labels("purge").inc(removed)
        log.warning("saf_purged", removed=removed, older_than_s=age)
        audit(
            audit_log,
            "saf_purged",
            actor=actor_of(request),
            action="saf.purge",
            target="saf",
            outcome="ok",
            removed=removed,
            older_than_s=age,
        )
        return JSONResponse({"removed": removed, "older_than": cutoff.isoformat()})

    def route(path: str, fn: Handler, method: str) -> Route:
        async def endpoint(request: Request) -> Response:
            return await guarded(fn, request)

        return Route(path, endpoint, methods=[method])

    return [
        route("/saf", list_entries, "GET"),
        route("/saf/stats", stats, "GET"),
        route("/saf/purge", purge, "POST"),
        route("/saf/{entry_id}", show, "GET"),
        route("/saf/{entry_id}/{action}", change, "POST"),
    ]
