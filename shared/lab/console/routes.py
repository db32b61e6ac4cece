"""The console's routes, added to the gateway's HTTP app by the lab (:mod:`shared.lab.network`).

* ``GET /console`` (and its ``app.js``, ``style.css``): the page, public: it holds no data;
* ``GET /console/api/view`` (reader token): the live view of ``paylab top`` (services up,
  TPS, answers by code, links with health, breaker and echo RTT, the queue) between the
  previous call and this one, and the gateway's newest journal rows;
* ``GET /console/api/trace?rrn=`` (reader token): the ladder of ``paylab trace``, each
  message's fields explained.

The services are read over their HTTP ports like ``paylab top`` and ``paylab trace`` do,
with the reader token of the settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from importlib import resources
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shared.lab.fields import field_rows
from shared.lab.top import Snapshot, compute_view
from shared.lab.trace import build_ladder
from shared.lab.trace_collect import TraceError, collect
from shared.lab.watch import Targets, fetch_snapshot
from shared.server.auth import public
from shared.server.http import json_error

_STATIC = {
    "": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
}

#: The page's own policy: its script and style only, data from this origin only.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


def _static(name: str) -> bytes:
    return resources.files("shared.lab.console").joinpath("static", name).read_bytes()


def console_routes(urls: Callable[[], Mapping[str, str]], token: str) -> Sequence[BaseRoute]:
    """The console's routes; ``urls()`` gives each service's HTTP base URL when asked (the
    ports of a network starting are known only once each service is up)."""
    previous: dict[str, Snapshot] = {}

    def targets() -> Targets:
        return Targets(dict(urls()), None, token)

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "")
        if name not in _STATIC:
            return json_error(404, "not found")
        filename, media = _STATIC[name]
        return Response(
            _static(filename),
            media_type=media,
            headers={"content-security-policy": _CSP, "cache-control": "no-cache"},
        )

    async def view(_request: Request) -> Response:
        t = targets()
        async with httpx.AsyncClient(timeout=3.0) as client:
            now = await fetch_snapshot(client, t)
            rows: list[dict[str, Any]] = []
            try:
                r = await client.get(
                    f"{t.services['gateway']}/transactions",
                    params={"limit": 15},
                    headers=dict(t.headers),
                )
                if r.status_code == 200:
                    rows = list(r.json().get("items", []))
            except httpx.HTTPError:
                pass
        before = previous.get("last", now)
        previous["last"] = now
        body = asdict(compute_view(before, now))
        body["transactions"] = rows
        body["gateway_links"] = [
            {k: link.get(k) for k in ("name", "healthy", "target", "last_echo_rtt_ms")}
            for link in (now.links or [])
        ]
        body["urls"] = dict(t.services)
        return JSONResponse(body)

    async def trace(request: Request) -> Response:
        rrn = request.query_params.get("rrn", "")
        if not (rrn.isascii() and rrn.isalnum() and 1 <= len(rrn) <= 12):
            return json_error(400, "rrn must be 1-12 letters or digits")
        try:
            entries = await collect(targets(), rrn, timeout=5.0)
        except TraceError as exc:
            return json_error(502, str(exc))
        arrows = []
        for a in build_ladder(entries):
            d = a.as_dict()
            d["fields"] = field_rows(a.fields)
            arrows.append(d)
        return JSONResponse({"rrn": rrn, "arrows": arrows})

    return [
        public(Route("/console", page, methods=["GET"])),
        public(Route("/console/{name:str}", page, methods=["GET"])),
        Route("/console/api/view", view, methods=["GET"]),
        Route("/console/api/trace", trace, methods=["GET"]),
    ]
