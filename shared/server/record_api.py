"""``GET /messages``: a service's message record over HTTP (reader token, like every admin
GET). Query: ``rrn``, ``terminal``, ``stan``, ``since`` (a sequence number: entries after
it), ``limit`` (1-2000, default 500), ``start_us``/``end_us`` (a window on the monotonic
clock, microseconds), ``newest=1`` (the newest ``limit`` matches rather than the oldest).
Answer: ``{"service", "size", "enabled", "messages": [...oldest first], "next": cursor}``;
pass ``next`` as ``since`` for the following page.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shared.server.http import json_error
from shared.server.record import MessageRecord, Query

MAX_LIMIT = 2000


def parse_query(params: dict[str, str]) -> Query:
    """The :class:`Query` of the request's parameters. Raises ValueError with a message."""
    try:
        since = int(params.get("since") or 0)
        limit = int(params.get("limit") or 500)
        start = params.get("start_us")
        end = params.get("end_us")
        start_us = int(start) if start else None
        end_us = int(end) if end else None
    except ValueError:
        raise ValueError("since, limit, start_us and end_us must be whole numbers") from None
    if since < 0 or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"since must be >= 0 and limit between 1 and {MAX_LIMIT}")
    return Query(
        rrn=params.get("rrn") or None,
        terminal=params.get("terminal") or None,
        stan=params.get("stan") or None,
        since=since,
        limit=limit,
        start_us=start_us,
        end_us=end_us,
        newest=params.get("newest", "") in ("1", "true", "yes"),
    )


def record_routes(record: MessageRecord) -> Sequence[BaseRoute]:
    """The ``/messages`` route of ``record``."""

    async def messages(request: Request) -> Response:
        try:
            q = parse_query(dict(request.query_params))
        except ValueError as exc:
            return json_error(400, str(exc))
        entries, cursor = record.query(q)
        return JSONResponse(
            {
                "service": record.service,
                "size": record.size,
                "enabled": record.enabled,
                "messages": [e.as_dict() for e in entries],
                "next": cursor,
            }
        )

    return [Route("/messages", messages, methods=["GET"])]
