"""The shell of the live view (``paylab top``, ``paylab demo``, ``paylab lab check``):
fetch, compute, draw (trio + httpx + rich).

:func:`fetch_snapshot` reads every source of one :class:`~shared.lab.top.Snapshot` at once (a
source that does not answer within the deadline is recorded as down); :func:`watch` takes
a snapshot every ``interval`` and hands each :class:`~shared.lab.top.View` to a callback;
:class:`Screen` draws views with rich ``Live`` on a terminal, or one line per frame
elsewhere (CI logs). The logic lives in ``shared/lab/top.py`` and ``shared/lab/top_view.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import trio
from rich.console import Console
from rich.live import Live

from shared.lab.top import SERVICES_SHOWN, Snapshot, View, compute_view
from shared.lab.top_view import render, summary_line

if TYPE_CHECKING:
    from shared.ops.settings import Settings

#: Deadline of one fetch: a source slower than this is shown as down for that frame.
FETCH_TIMEOUT = 2.0


@dataclass(frozen=True)
class Targets:
    """Where to read: each service's HTTP base URL, the chaos controller's, the token."""

    services: Mapping[str, str]
    chaos: str | None = None
    token: str = ""
    headers: Mapping[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", {"Authorization": f"Bearer {self.token}"})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "not answering (connection refused)"
    if isinstance(exc, httpx.TimeoutException):
        return "not answering (timed out)"
    return f"not answering ({type(exc).__name__})"


async def fetch_snapshot(
    client: httpx.AsyncClient, targets: Targets, *, timeout: float = FETCH_TIMEOUT
) -> Snapshot:
    """Read every source concurrently and build the snapshot (never raises on a failure)."""
    texts: dict[str, str | None] = {name: None for name in targets.services}
    bodies: dict[str, Any] = {}
    errors: dict[str, str] = {}

    async def get(source: str, url: str, json_body: bool, auth: bool) -> None:
        try:
            with trio.fail_after(timeout):
                r = await client.get(url, headers=dict(targets.headers) if auth else None)
        except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
            errors[source] = _reason(exc)
            return
        if r.status_code != 200:
            errors[source] = f"HTTP {r.status_code}"
            return
        if not json_body:
            texts[source] = r.text
            return
        try:
            bodies[source] = r.json()
        except ValueError:
            errors[source] = "answer is not JSON"

    at = trio.current_time()
    async with trio.open_nursery() as nursery:
        for name, base in targets.services.items():
            nursery.start_soon(get, name, f"{base}/metrics", False, False)
        gateway = targets.services.get("gateway")
        if gateway is not None:
            for path in ("/links", "/saf/stats"):
                nursery.start_soon(get, f"gateway {path}", gateway + path, True, True)
        for name, base in targets.services.items():  # every service's breakers
            nursery.start_soon(get, f"{name} /breakers", f"{base}/breakers", True, True)
        if targets.chaos is not None:
            nursery.start_soon(get, "chaos", f"{targets.chaos}/chaos", True, True)
    # An admin endpoint of a service that is down says nothing new: one line per service.
    if texts.get("gateway") is None:
        for path in ("/links", "/saf/stats"):
            errors.pop(f"gateway {path}", None)
    for name in targets.services:
        if texts.get(name) is None:
            errors.pop(f"{name} /breakers", None)
    return Snapshot.build(
        at,
        texts,
        links=bodies.get("gateway /links"),
        breakers=_all_breakers(targets.services, bodies),
        saf=bodies.get("gateway /saf/stats"),
        chaos=bodies.get("chaos"),
        errors=errors,
    )


def _all_breakers(services: Mapping[str, str], bodies: Mapping[str, Any]) -> Any:
    """The ``/breakers`` answers of every service as one body, each breaker naming its
    service; None when no service answered. A body of the wrong shape is passed on as it
    is, for :meth:`Snapshot.build` to record."""
    found = [
        (name, bodies[f"{name} /breakers"]) for name in services if f"{name} /breakers" in bodies
    ]
    if not found:
        return None
    items: list[Any] = []
    for name, body in found:
        listed = body.get("breakers") if isinstance(body, dict) else None
        if not isinstance(listed, list):
            return body
        items += [{"service": name, **b} if isinstance(b, dict) else b for b in listed]
    return {"breakers": items}


async def watch(
    targets: Targets,
    interval: float,
    on_view: Callable[[View], None],
    *,
    frames: int | None = None,
    client: httpx.AsyncClient | None = None,
) -> View | None:
    """Snapshot every ``interval`` seconds and call ``on_view`` with each view.

    The first view comes after two snapshots, ``interval`` apart. Stops after ``frames``
    views (None: until cancelled) and returns the last one.
    """
    own = client is None
    http = client or httpx.AsyncClient()
    last: View | None = None
    shown = 0
    try:
        before = await fetch_snapshot(http, targets)
        next_at = before.at + interval
        while frames is None or shown < frames:
            await trio.sleep_until(next_at)
            next_at = max(next_at + interval, trio.current_time())
            now = await fetch_snapshot(http, targets)
            last = compute_view(before, now, chaos_expected=targets.chaos is not None)
            on_view(last)
            shown += 1
            before = now
    finally:
        if own:
            with trio.CancelScope(shield=True):
                await http.aclose()
    return last


class Screen:
    """Where frames go: rich ``Live`` on a terminal, one line per frame otherwise.

    Use as a context manager; :meth:`show` draws a view with an optional caption.
    """

    def __init__(self, console: Console, *, live: bool | None = None) -> None:
        self.console = console
        self.live_mode = console.is_terminal if live is None else live
        self._live: Live | None = None
        self._started = time.monotonic()

    def __enter__(self) -> Screen:
        if self.live_mode:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def show(self, view: View, caption: str | None = None) -> None:
        if self._live is not None:
            self._live.update(render(view, caption), refresh=True)
        else:
            elapsed = time.monotonic() - self._started
            self.console.print(summary_line(view, caption, elapsed), soft_wrap=True, markup=False)


def default_targets(
    settings: Settings,
    gateway_url: str | None = None,
    acquirer_url: str | None = None,
    billing_url: str | None = None,
    hsm_url: str | None = None,
    chaos_url: str | None = None,
    token: str | None = None,
) -> Targets:
    """Targets from explicit URLs, else ``settings``' host and ports (and reader token)."""
    given = {
        "acquirer": acquirer_url,
        "gateway": gateway_url,
        "billing": billing_url,
        "hsm": hsm_url,
    }
    services = {
        name: (given[name] or f"http://{settings.host}:{settings.http_port(name)}").rstrip("/")
        for name in SERVICES_SHOWN
    }
    chaos = chaos_url
    if chaos is None:
        chaos = (
            f"http://{settings.host}:{settings.chaos_http_port}"
            if settings.chaos_http_port
            else None
        )
    return Targets(
        services, chaos.rstrip("/") if chaos else None, token or settings.admin_token_read
    )


async def once(targets: Targets, interval: float) -> View | None:
    """One view: two snapshots ``interval`` apart."""
    views: list[View] = []
    return await watch(targets, interval, views.append, frames=1)


async def chaos_answers(targets: Targets) -> bool:
    """Whether the chaos controller of ``targets`` answers now (within a second)."""
    if targets.chaos is None:
        return False
    async with httpx.AsyncClient() as client:
        try:
            with trio.fail_after(1.0):
                r = await client.get(f"{targets.chaos}/chaos", headers=dict(targets.headers))
        except (httpx.HTTPError, trio.TooSlowError, OSError):
            return False
    return r.status_code == 200
