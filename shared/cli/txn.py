"""``paylab txn RRN|ID``: one transaction as the network recorded it, the acquirer's record
(``GET /transactions/{id}``, or ``?rrn=`` with the reader token) and the gateway's journal
and queue entries (``GET /transactions?rrn=``, reader token), side by side."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import typer

from shared.cli.console import fail, load_settings, out
from shared.cli.options import AcquirerUrl, GatewayUrl, JsonOpt, ReaderToken

#: An RRN (field 37) is 12 characters; the acquirer's ids are 32 hex digits.
_RRN = re.compile(r"^[0-9A-Za-z]{12}$")
_JOURNAL_COLUMNS = ("id", "mti", "rrn", "stan", "terminal_id", "status", "response_code")


def _get(url: str, path: str, token: str) -> tuple[int, Any]:
    """GET ``url + path`` with the bearer token: (HTTP status, JSON body or None). Nothing
    listening is one line and exit code 1."""
    import httpx

    try:
        r = httpx.get(url + path, timeout=10, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url} ({type(exc).__name__}); is the network running?")
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, None


def lookup(ref: str, acquirer: str, gateway: str, token: str) -> dict[str, Any]:
    """The acquirer's records and the gateway's journal rows and queue entries of ``ref``
    (an RRN or an acquirer transaction id). Refused access fails with one line."""
    records: list[dict[str, Any]] = []
    if _RRN.match(ref):
        status, body = _get(acquirer, f"/transactions?rrn={ref}", token)
        if status in (401, 403):
            fail(f"the acquirer refused the token (HTTP {status}); see docs/security.md")
        if status == 200 and body:
            records = list(body.get("items", []))
        rrns = [ref]
    else:
        status, body = _get(acquirer, f"/transactions/{ref}", token)
        if status == 200 and body:
            records = [body]
        rrns = [r for r in {rec.get("rrn") for rec in records} if r]
    journal: list[dict[str, Any]] = []
    queue: list[dict[str, Any]] = []
    for rrn in rrns:
        status, body = _get(gateway, f"/transactions?rrn={rrn}", token)
        if status in (401, 403):
            fail(f"the gateway refused the token (HTTP {status}); see docs/security.md")
        if status == 200 and body:
            journal += body.get("items", [])
            queue += body.get("queue", [])
    return {"ref": ref, "acquirer": records, "gateway_journal": journal, "gateway_queue": queue}


def txn(
    ref: Annotated[str, typer.Argument(help="An RRN (12 characters) or an acquirer id.")],
    acquirer_url: AcquirerUrl = None,
    gateway_url: GatewayUrl = None,
    token: ReaderToken = None,
    as_json: JsonOpt = False,
) -> None:
    """One transaction: the acquirer's record and the gateway's journal. Exit 1 when
    neither knows it."""
    from rich.table import Table

    s = load_settings()
    found = lookup(
        ref,
        (acquirer_url or f"http://{s.host}:{s.acquirer_http_port}").rstrip("/"),
        (gateway_url or f"http://{s.host}:{s.gateway_http_port}").rstrip("/"),
        token or s.admin_token_read,
    )
    if as_json:
        out.print_json(json.dumps(found))
    else:
        for rec in found["acquirer"]:
            out.print(f"[bold]acquirer[/] {rec.get('kind')} {rec.get('id')}")
            for key, value in rec.items():
                if key != "id" and value not in (None, ""):
                    out.print(f"  {key:<14} {value}")
        if found["gateway_journal"]:
            table = Table(title="gateway journal")
            for col in (*_JOURNAL_COLUMNS, "received_at"):
                table.add_column(col)
            for row in found["gateway_journal"]:
                table.add_row(*(str(row.get(c, "-")) for c in (*_JOURNAL_COLUMNS, "received_at")))
            out.print(table)
        for entry in found["gateway_queue"]:
            out.print(
                f"[bold]gateway queue[/] entry {entry.get('id')}: {entry.get('kind')} "
                f"{entry.get('state')}, attempts {entry.get('attempts')}"
            )
    if not (found["acquirer"] or found["gateway_journal"]):
        if not as_json:
            out.print(f"no transaction {ref} at the acquirer or in the gateway's journal")
        raise typer.Exit(1)
