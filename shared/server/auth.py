"""Admin access control, security headers and the audit stream of every HTTP port.

:class:`AdminGuard` is a plain ASGI middleware that ``shared.server.http.service_app`` puts in
front of every service's routes:

* ``/health``, ``/livez``, ``/readyz``, ``/metrics`` and the routes a service marks public
  (:func:`public`: the acquirer's customer API) stay open;
* every other request needs ``Authorization: Bearer <token>``: the read-only token allows
  GET/HEAD, the operator token allows everything. No or a wrong token is a 401 JSON answer
  with ``WWW-Authenticate: Bearer``; the read-only token on a state-changing method is a
  403. Tokens are compared in constant time (:func:`hmac.compare_digest`);
* every answer carries ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and
  ``Referrer-Policy: no-referrer``; authenticated (admin) answers also
  ``Cache-Control: no-store``;
* every denied request and every authenticated state-changing request is written to the
  audit stream (:func:`audit`): a structlog logger bound to ``stream="audit"`` with
  ``actor`` (the role, never the token), ``action``, ``target`` and ``outcome``.

The handlers find the caller's role in ``request.state.admin_role`` (:func:`actor_of`).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.ops.settings import DEFAULT_OPERATOR_TOKEN, DEFAULT_READ_TOKEN

READER = "reader"
OPERATOR = "operator"

#: Paths that are always open: probes and scrapers carry no token.
OPEN_PATHS = frozenset({"/health", "/livez", "/readyz", "/metrics"})
#: Methods a read-only token may use.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
NO_STORE = (b"cache-control", b"no-store")

_PUBLIC_ATTR = "paylab_public"


def audit_logger(service: str) -> Any:
    """The audit stream: structlog, bound to ``stream="audit"`` (same sink as other logs)."""
    return structlog.get_logger("audit").bind(stream="audit", service=service)


def audit_stream(log: Any) -> Any:
    """The audit stream derived from a service's logger (keeps its ``service`` binding)."""
    return log.bind(stream="audit")


def audit(
    log: Any, event: str, *, actor: str, action: str, target: str, outcome: str, **extra: Any
) -> None:
    """Write one audit record; denials at warning level, the rest at info."""
    level = "warning" if outcome.startswith("denied") else "info"
    getattr(log, level)(event, actor=actor, action=action, target=target, outcome=outcome, **extra)


def actor_of(request: Request) -> str:
    """The role of the caller of an admin route (``anonymous`` when none was checked)."""
    return str(getattr(request.state, "admin_role", "anonymous"))


def public(route: BaseRoute) -> BaseRoute:
    """Mark ``route`` as open (no token): a customer-facing API, not an admin one."""
    setattr(route, _PUBLIC_ATTR, True)
    return route


def is_public(route: BaseRoute) -> bool:
    return bool(getattr(route, _PUBLIC_ATTR, False))


def default_tokens_in_use(read_token: str, operator_token: str) -> list[str]:
    """The names of the tokens still at their documented lab value."""
    out = []
    if read_token == DEFAULT_READ_TOKEN:
        out.append("admin_token_read")
    if operator_token == DEFAULT_OPERATOR_TOKEN:
        out.append("admin_token_operator")
    return out


class AdminGuard:
    """ASGI middleware: bearer-token roles on admin routes, security headers, audit."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        service: str,
        read_token: str = DEFAULT_READ_TOKEN,
        operator_token: str = DEFAULT_OPERATOR_TOKEN,
        public_routes: Iterable[BaseRoute] = (),
    ) -> None:
        self.app = app
        self._tokens = (
            (OPERATOR, operator_token.encode()),
            (READER, read_token.encode()),
        )
        self._public = tuple(public_routes)
        self._audit = audit_logger(service)

    def _role(self, scope: Scope) -> str | None:
        auth = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                auth = value
                break
        scheme, _, presented = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            return None
        presented = presented.strip()
        role = None
        for name, token in self._tokens:  # compare against both: constant work either way
            if hmac.compare_digest(presented, token) and role is None:
                role = name
        return role

    def _is_open(self, scope: Scope) -> bool:
        if scope["path"] in OPEN_PATHS:
            return True
        return any(route.matches(scope)[0] is not Match.NONE for route in self._public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._is_open(scope):
            await self.app(scope, receive, self._with_headers(send, admin=False))
            return
        method = scope["method"]
        target = scope["path"]
        role = self._role(scope)
        if role is None:
            audit(
                self._audit,
                "admin_denied",
                actor="anonymous",
                action=method,
                target=target,
                outcome="denied:401",
            )
            await self._deny(send, 401, "missing or invalid admin token")
            return
        if role == READER and method not in READ_METHODS:
            audit(
                self._audit,
                "admin_denied",
                actor=role,
                action=method,
                target=target,
                outcome="denied:403",
            )
            await self._deny(send, 403, "the read-only token cannot change state")
            return
        scope.setdefault("state", {})["admin_role"] = role
        status: list[int] = []
        inner = self._with_headers(send, admin=True, status=status)
        try:
            await self.app(scope, receive, inner)
        finally:
            if method not in READ_METHODS:
                code = status[0] if status else 500
                audit(
                    self._audit,
                    "admin_request",
                    actor=role,
                    action=method,
                    target=target,
                    outcome="ok" if code < 400 else f"failed:{code}",
                    status=code,
                )

    @staticmethod
    def _with_headers(send: Send, *, admin: bool, status: list[int] | None = None) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                if status is not None:
                    status.append(int(message["status"]))
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if not (admin and k.lower() == b"cache-control")
                ]
                headers.extend(SECURITY_HEADERS)
                if admin:
                    headers.append(NO_STORE)
                message = {**message, "headers": headers}
            await send(message)

        return wrapped

    async def _deny(self, send: Send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *SECURITY_HEADERS,
            NO_STORE,
        ]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="paylab-admin"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def admin_headers_for(token: str) -> MutableMapping[str, str]:
    """The request header that carries ``token`` (for clients and tests)."""
    return {"Authorization": f"Bearer {token}"}
