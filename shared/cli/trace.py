"""``paylab trace``: one payment across the four services, as a ladder (the pure part is
``shared/lab/trace.py``, the fetching ``shared/lab/trace_collect.py``)."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.cli.console import fail, load_settings, out
from shared.cli.options import AcquirerUrl, BillingUrl, GatewayUrl, HsmUrl, JsonOpt, ReaderToken


def trace(
    rrn: Annotated[
        str | None, typer.Argument(help="Retrieval reference number (field 37).")
    ] = None,
    tx_id: Annotated[
        str | None, typer.Option("--id", help="The acquirer's transaction id instead of an RRN.")
    ] = None,
    last: Annotated[bool, typer.Option("--last", help="The newest transaction.")] = False,
    fields: Annotated[
        bool, typer.Option("--fields", help="Every message field by field, codes explained.")
    ] = False,
    as_json: JsonOpt = False,
    gateway_url: GatewayUrl = None,
    acquirer_url: AcquirerUrl = None,
    billing_url: BillingUrl = None,
    hsm_url: HsmUrl = None,
    token: ReaderToken = None,
) -> None:
    """Follow one payment across every hop: terminal/API, acquirer, gateway, HSM, billing.

    Reads each service's message record (GET /messages, reader token) and prints the
    ladder: each message as an arrow with its time, the time since the previous one and
    the time on the wire; retries, stand-in advices, reversals and late answers are their
    own arrows. Exit code 1 when the transaction is not found or nothing answers.
    """
    import json

    import trio

    from shared.errors import PaylabError
    from shared.lab.trace import build_ladder, render
    from shared.lab.trace_collect import collect, resolve_rrn
    from shared.lab.watch import default_targets

    if sum(bool(x) for x in (rrn, tx_id, last)) != 1:
        fail("name one transaction: an RRN, --id TRANSACTION_ID or --last")
    targets = default_targets(
        load_settings(), gateway_url, acquirer_url, billing_url, hsm_url, None, token
    )

    async def run() -> tuple[str, list[dict[str, object]]]:
        found = await resolve_rrn(targets, rrn, tx_id, last)
        return found, await collect(targets, found)

    try:
        found, entries = trio.run(run)
    except PaylabError as exc:
        fail(str(exc))
    if not entries:
        fail(f"no message with RRN {found} in any record (too old, or the record is off)")
    arrows = build_ladder(entries)
    if as_json:
        print(json.dumps({"rrn": found, "arrows": [a.as_dict() for a in arrows]}, indent=2))
        return
    out.print(f"RRN {found}: {len(arrows)} messages", highlight=False)
    out.print(render(arrows, fields=fields), markup=False, highlight=False)
