"""``paylab saf``: the gateway's store-and-forward queue, from its operators' API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from shared.cli.admin import admin_call, admin_url
from shared.cli.console import out
from shared.cli.options import AdminToken, AdminUrl, JsonOpt

app = typer.Typer(help="The gateway's store-and-forward queue.", no_args_is_help=True)

_SAF_COLUMNS = ("id", "kind", "state", "mti", "rrn", "terminal_id", "amount", "attempts")


def _seconds(stamp: str | None) -> str:
    """An ISO 8601 time to the second, its offset kept (``2026-12-07T00:22:50+00:00``)."""
    if not stamp:
        return "-"
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp).isoformat(timespec="seconds")
    except ValueError:
        return stamp


def _show_entries(items: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table()
    for col in (*_SAF_COLUMNS, "code", "created_at"):
        table.add_column(col)
    for e in items:
        table.add_row(
            *(str(e.get(c) if e.get(c) is not None else "-") for c in _SAF_COLUMNS),
            e.get("response_code") or "-",
            _seconds(e.get("created_at")),
        )
    out.print(table)


@app.command("list")
def saf_list(
    state: Annotated[
        str | None, typer.Option(help="queued, in_flight, done, dead or cancelled.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Entries per page.")] = 50,
    before_id: Annotated[
        int | None, typer.Option(help="Page on: entries older than this id.")
    ] = None,
    rrn: Annotated[str | None, typer.Option(help="Only this RRN (field 37).")] = None,
    url: AdminUrl = None,
    token: AdminToken = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue entries, newest first."""
    params = {"state": state, "limit": limit, "before_id": before_id, "rrn": rrn}
    query = "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
    data = admin_call("GET", admin_url(url), f"/saf?{query}", token)
    if as_json:
        out.print_json(json.dumps(data))
        return
    _show_entries(data["items"])
    if data.get("next_before_id"):
        out.print(f"more: --before-id {data['next_before_id']}")


EntryId = Annotated[int, typer.Argument(help="Queue entry id (see `paylab saf list`).")]


@app.command("show")
def saf_show(entry_id: EntryId, url: AdminUrl = None, token: AdminToken = None) -> None:
    """One entry, every field (the PAN masked; the message itself is never shown)."""
    out.print_json(json.dumps(admin_call("GET", admin_url(url), f"/saf/{entry_id}", token)))


@app.command("retry")
def saf_retry(entry_id: EntryId, url: AdminUrl = None, token: AdminToken = None) -> None:
    """Put a dead entry back in the queue, due now."""
    _show_entries([admin_call("POST", admin_url(url), f"/saf/{entry_id}/retry", token)])


@app.command("cancel")
def saf_cancel(entry_id: EntryId, url: AdminUrl = None, token: AdminToken = None) -> None:
    """Cancel an entry: it is never forwarded afterwards."""
    _show_entries([admin_call("POST", admin_url(url), f"/saf/{entry_id}/cancel", token)])


@app.command("purge")
def saf_purge(
    older_than: Annotated[
        int | None, typer.Option(help="Seconds (default: PAYLAB_SAF_RETENTION).")
    ] = None,
    url: AdminUrl = None,
    token: AdminToken = None,
) -> None:
    """Delete done and cancelled entries older than the retention period."""
    query = "" if older_than is None else f"?older_than={older_than}"
    data = admin_call("POST", admin_url(url), f"/saf/purge{query}", token)
    out.print(f"removed {data['removed']} entries older than {data['older_than']}")


@app.command("stats")
def saf_stats(url: AdminUrl = None, token: AdminToken = None, as_json: JsonOpt = False) -> None:
    """Entries by state, depth and the oldest entry's age."""
    data = admin_call("GET", admin_url(url), "/saf/stats", token)
    if as_json:
        out.print_json(json.dumps(data))
        return
    for state, n in data["counts"].items():
        out.print(f"{state:<10} {n}")
    age = data.get("oldest_queued_age_seconds")
    out.print(f"depth      {data['depth']}  (oldest {'-' if age is None else f'{age:.1f} s'})")
