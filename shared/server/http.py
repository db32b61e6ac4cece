"""The HTTP side of every service: starlette app with /health and /metrics, served by
hypercorn inside the service's trio nursery.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shared.ops.log import get_logger
from shared.ops.metrics import ServiceMetrics
from shared.ops.settings import DEFAULT_OPERATOR_TOKEN, DEFAULT_READ_TOKEN
from shared.server.auth import SECURITY_HEADERS, AdminGuard, is_public

#: A readiness check: returns (ok, detail) for one dependency.
HealthCheck = Callable[[], Awaitable[tuple[bool, str]]]
#: The checks of the service itself (``/readyz``); the others are its upstream links.
SELF_CHECKS = frozenset({"database", "ledger"})


def json_error(status: int, message: str, **extra: Any) -> JSONResponse:
    """The one shape of an HTTP error body: ``{"error": message, ...}``."""
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_error(exc.status_code, str(exc.detail))


def _unhandled_handler(log: Any) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def _unhandled(request: Request, exc: Exception) -> Response:
        log.error(
            "http_handler_failed",
            path=request.url.path,
            error=type(exc).__name__,
            exc_info=exc,
        )
        response = json_error(500, "internal error")
        # Answered outside AdminGuard (by starlette's outermost middleware): same headers.
        response.headers.update({k.decode(): v.decode() for k, v in SECURITY_HEADERS})
        response.headers["cache-control"] = "no-store"
        return response

    return _unhandled


def service_app(
    service: str,
    metrics: ServiceMetrics,
    checks: dict[str, HealthCheck] | None = None,
    routes: Sequence[BaseRoute] = (),
    log: Any = None,
    extra: Callable[[], dict[str, Any]] | None = None,
    admin_tokens: tuple[str, str] = (DEFAULT_READ_TOKEN, DEFAULT_OPERATOR_TOKEN),
) -> Starlette:
    """A starlette app with ``GET /health``, ``/livez``, ``/readyz``, ``/metrics`` and the
    service's ``routes``.

    ``/health`` answers 200 when every readiness check passes and 503 otherwise, with
    ``{"service", "status": "ok"|"degraded", "live": true, "dependencies": {name: {...}}}``
    plus what ``extra()`` returns (the health score): the process is alive whenever it
    answers at all.

    The two probes of an orchestrator (Kubernetes ``httpGet``): ``/livez`` answers 200
    whenever the process answers at all (it runs no check: a restart cannot bring an
    upstream back); ``/readyz`` answers 200 when the checks of the service itself pass
    (:data:`SELF_CHECKS`: its database, billing's ledger) and 503 otherwise. An upstream
    outage is the same for every replica, so it does not take them out of their Service.

    Every other route needs an admin token, ``admin_tokens`` = (read-only, operator),
    except the ones marked with :func:`shared.server.auth.public`; every answer carries the
    security headers (see :mod:`shared.server.auth`).
    """
    checks = checks or {}

    async def health(_request: Request) -> Response:
        deps: dict[str, dict[str, Any]] = {}
        for name, check in checks.items():
            try:
                with trio.fail_after(2):
                    ok, detail = await check()
            except Exception as exc:  # a failing check is a degraded state, not a 500
                ok, detail = False, f"check failed: {type(exc).__name__}"
            deps[name] = {"ok": ok, "detail": detail}
        ready = all(d["ok"] for d in deps.values())
        body = {
            "service": service,
            "status": "ok" if ready else "degraded",
            "live": True,
            "ready": ready,
            "dependencies": deps,
            **(extra() if extra is not None else {}),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def livez(_request: Request) -> Response:
        return JSONResponse({"service": service, "live": True})

    async def readyz(_request: Request) -> Response:
        failing: dict[str, str] = {}
        for name, check in checks.items():
            if name not in SELF_CHECKS:
                continue
            try:
                with trio.fail_after(2):
                    ok, detail = await check()
            except Exception as exc:
                ok, detail = False, f"check failed: {type(exc).__name__}"
            if not ok:
                failing[name] = detail
        body = {"service": service, "ready": not failing, "failing": failing}
        return JSONResponse(body, status_code=503 if failing else 200)

    async def metrics_endpoint(_request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/livez", livez, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *routes,
        ],
        exception_handlers={
            HTTPException: _http_exception,
            Exception: _unhandled_handler(log or get_logger(service)),
        },
        middleware=[
            Middleware(
                AdminGuard,
                service=service,
                read_token=admin_tokens[0],
                operator_token=admin_tokens[1],
                public_routes=[r for r in routes if is_public(r)],
            )
        ],
    )


async def serve_http(
    app: Starlette,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout: float = 5.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn on trio; ``task_status.started`` gets the bound port.

    When ``shutdown_trigger`` returns, no new request is accepted and requests in progress
    get ``graceful_timeout`` seconds to finish.
    """
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = graceful_timeout

    async def _serve(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve)
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
