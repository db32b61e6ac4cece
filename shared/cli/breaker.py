"""``paylab breaker``: the circuit breakers of every service's upstreams, from their admin
APIs (``GET /breakers`` on each service's HTTP port)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer

from shared.cli.admin import admin_call
from shared.cli.console import err, fail, load_settings, out
from shared.cli.options import AdminToken, JsonOpt

app = typer.Typer(help="Circuit breakers of every service's upstreams.", no_args_is_help=True)

#: The services whose breakers are read (every one with an upstream link, and the HSM,
#: whose empty list says it has none).
SERVICES = ("acquirer", "gateway", "billing", "hsm")


def breaker_id(breaker: Mapping[str, Any]) -> str:
    """``service/upstream`` (``gateway/billing``); an answer without ``service`` is the
    gateway's (older gateways)."""
    return f"{breaker.get('service') or 'gateway'}/{breaker.get('name')}"


def match_breakers(items: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    """The breakers ``name`` stands for: ``service/upstream`` names one; a bare upstream
    name names every breaker to it (``hsm``: the gateway's and billing's)."""
    if "/" in name:
        return [b for b in items if breaker_id(b) == name]
    return [b for b in items if b.get("name") == name]


BreakerUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="HTTP base URL of one service (default: every service, at "
        "http://<host>:<its HTTP port>).",
    ),
]


def _breaker_services(url: str | None) -> dict[str, str]:
    """Where to read breakers: one URL, or every service of the settings."""
    if url:
        return {"": url.rstrip("/")}
    s = load_settings()
    return {svc: f"http://{s.host}:{s.http_port(svc)}" for svc in SERVICES}


def _try_admin(method: str, url: str, path: str, token: str | None) -> tuple[Any, str | None]:
    """Like :func:`shared.cli.admin.admin_call`, but a failure is returned as its reason,
    not an exit."""
    import httpx

    bearer = token or load_settings().admin_token_operator
    try:
        r = httpx.request(
            method, url + path, timeout=5, headers={"Authorization": f"Bearer {bearer}"}
        )
    except httpx.HTTPError as exc:
        return None, f"not answering ({type(exc).__name__})"
    try:
        data = r.json()
    except ValueError:
        return None, f"HTTP {r.status_code} without JSON"
    if r.status_code >= 400:
        return None, str(data.get("error", f"HTTP {r.status_code}"))
    return data, None


def _read_breakers(
    services: Mapping[str, str], token: str | None
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, str]]:
    """Every breaker of ``services``: (breakers, {service: its URL}, {source: error})."""
    items: list[dict[str, Any]] = []
    urls: dict[str, str] = {}
    errors: dict[str, str] = {}
    for service, base in services.items():
        data, error = _try_admin("GET", base, "/breakers", token)
        if error is not None:
            errors[service or base] = error
            continue
        for b in data.get("breakers", []) if isinstance(data, dict) else []:
            entry = dict(b)
            entry.setdefault("service", service or "gateway")
            urls[entry["service"]] = base
            items.append(entry)
    return items, urls, errors


def _show_breakers(items: Sequence[Mapping[str, Any]]) -> None:
    from rich.table import Table

    table = Table()
    # "retry in": the time left open before a half-open trial (it counts down).
    columns = ("breaker", "state", "calls", "failures", "failure rate", "retry in", "probe in")
    for col in (*columns, "rejected"):
        # The name and state are what the reader (or a script) is after: never cut short.
        table.add_column(col, no_wrap=col in ("breaker", "state"))
    for b in items:
        rate = b.get("failure_rate")
        remaining = b.get("open_remaining")
        probe = b.get("probe_in")
        if b["state"] == "forced_open":
            left = "until reset"
        else:
            left = f"{remaining:.1f} s" if remaining else "-"
        table.add_row(
            breaker_id(b),
            b["state"],
            str(b["calls_in_window"]),
            str(b["failures_in_window"]),
            "-" if rate is None else f"{rate:.0%}",
            left,
            "-" if probe is None else f"{probe:.1f} s",
            str(b["rejected"]),
        )
    out.print(table)


@app.command("status")
def breaker_status(
    url: BreakerUrl = None, token: AdminToken = None, as_json: JsonOpt = False
) -> None:
    """Every breaker of every service: state, window figures, time left open, next probe,
    calls rejected."""
    from rich.markup import escape

    items, _urls, errors = _read_breakers(_breaker_services(url), token)
    if not items and errors:
        fail("; ".join(f"{k}: {v}" for k, v in errors.items()))
    if as_json:
        out.print_json(json.dumps({"breakers": items, "errors": errors}))
        return
    _show_breakers(items)
    for source, reason in errors.items():
        err.print(f"[yellow]{escape(source)}:[/] {escape(reason)}")


def _breaker_action(action: str, name: str, url: str | None, token: str | None) -> None:
    items, urls, errors = _read_breakers(_breaker_services(url), token)
    matches = match_breakers(items, name)
    if not matches:
        known = ", ".join(breaker_id(b) for b in items) or "none answered"
        extra = f"; {'; '.join(f'{k}: {v}' for k, v in errors.items())}" if errors else ""
        fail(f"no breaker named {name!r} ({known}){extra}")
    done = []
    for b in matches:
        base = urls[str(b["service"])]
        done.append(admin_call("POST", base, f"/breakers/{b['name']}/{action}", token))
    _show_breakers(done)


BreakerName = Annotated[
    str,
    typer.Argument(
        help="SERVICE/UPSTREAM (acquirer/gateway, gateway/billing, gateway/hsm, billing/hsm), "
        "or an upstream name for every breaker to it (hsm: the gateway's and billing's)."
    ),
]


@app.command("reset")
def breaker_reset(name: BreakerName, url: BreakerUrl = None, token: AdminToken = None) -> None:
    """Close a breaker now (also ends forced-open and disabled)."""
    _breaker_action("reset", name, url, token)


@app.command("open")
def breaker_open(name: BreakerName, url: BreakerUrl = None, token: AdminToken = None) -> None:
    """Force a breaker open: calls fail fast until `paylab breaker reset`."""
    _breaker_action("force-open", name, url, token)


@app.command("disable")
def breaker_disable(name: BreakerName, url: BreakerUrl = None, token: AdminToken = None) -> None:
    """Let everything through (metrics still kept) until `paylab breaker reset`."""
    _breaker_action("disable", name, url, token)
