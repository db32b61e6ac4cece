"""``paylab breaker``: the circuit breakers of the gateway's upstreams, from its admin API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from shared.cli.admin import admin_call, admin_url
from shared.cli.console import out
from shared.cli.options import AdminToken, AdminUrl, JsonOpt

app = typer.Typer(help="Circuit breakers of the gateway's upstreams.", no_args_is_help=True)


def _show_breakers(items: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table()
    # "retry in": the time left open before a half-open trial (it counts down).
    for col in ("upstream", "state", "calls", "failures", "failure rate", "retry in", "rejected"):
        # The name and state are what the reader (or a script) is after: never cut short.
        table.add_column(col, no_wrap=col in ("upstream", "state"))
    for b in items:
        rate = b.get("failure_rate")
        remaining = b.get("open_remaining")
        if b["state"] == "forced_open":
            left = "until reset"
        else:
            left = f"{remaining:.1f} s" if remaining else "-"
        table.add_row(
            b["name"],
            b["state"],
            str(b["calls_in_window"]),
            str(b["failures_in_window"]),
            "-" if rate is None else f"{rate:.0%}",
            left,
            str(b["rejected"]),
        )
    out.print(table)


@app.command("status")
def breaker_status(
    url: AdminUrl = None, token: AdminToken = None, as_json: JsonOpt = False
) -> None:
    """Every breaker: state, window figures, time left open, calls rejected."""
    data = admin_call("GET", admin_url(url), "/breakers", token)
    if as_json:
        out.print_json(json.dumps(data))
    else:
        _show_breakers(data["breakers"])


def _breaker_action(action: str, name: str, url: str | None, token: str | None) -> None:
    data = admin_call("POST", admin_url(url), f"/breakers/{name}/{action}", token)
    _show_breakers([data])


BreakerName = Annotated[str, typer.Argument(help="Upstream name: billing or hsm.")]


@app.command("reset")
def breaker_reset(name: BreakerName, url: AdminUrl = None, token: AdminToken = None) -> None:
    """Close a breaker now (also ends forced-open and disabled)."""
    _breaker_action("reset", name, url, token)


@app.command("open")
def breaker_open(name: BreakerName, url: AdminUrl = None, token: AdminToken = None) -> None:
    """Force a breaker open: calls fail fast until `paylab breaker reset`."""
    _breaker_action("force-open", name, url, token)


@app.command("disable")
def breaker_disable(name: BreakerName, url: AdminUrl = None, token: AdminToken = None) -> None:
    """Let everything through (metrics still kept) until `paylab breaker reset`."""
    _breaker_action("disable", name, url, token)
