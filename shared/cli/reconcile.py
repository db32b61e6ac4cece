"""``paylab reconcile``: the gateway's journal and queue against billing's postings."""

from __future__ import annotations

import json

import typer

from shared.cli.console import fail, load_settings, out
from shared.cli.options import DataDir, JsonOpt


def reconcile(data_dir: DataDir = None, as_json: JsonOpt = False) -> None:
    """Compare the gateway's journal and queue with billing's postings.

    Reads both databases (PAYLAB_GATEWAY_DB_URL, PAYLAB_BILLING_DB_URL, or the SQLite files
    in the data directory) and prints every mismatch. Exit code 1 when there is one.
    Transactions still being delivered are counted as pending, not as mismatches.
    """
    from gateway.reconcile import load_gateway_facts, load_postings
    from gateway.reconcile import reconcile as compare
    from shared.store.db import DatabaseError, make_engine, session_factory

    settings = load_settings(data_dir)
    engines = []
    try:
        gateway_engine = make_engine(settings.db_url("gateway"))
        billing_engine = make_engine(settings.db_url("billing"))
        engines = [gateway_engine, billing_engine]
        report = compare(
            load_gateway_facts(session_factory(gateway_engine)), load_postings(billing_engine)
        )
    except DatabaseError as exc:
        fail(f"cannot read the databases: {exc}")
        raise  # unreachable
    finally:
        for engine in engines:
            engine.dispose()
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        out.print(
            f"checked {report.checked} transactions: {report.pending} pending, "
            f"{len(report.mismatches)} mismatches"
        )
        for m in report.mismatches:
            out.print(f"  [red]{m.kind}[/] {m.key}: {m.detail}")
    if not report.clean:
        raise typer.Exit(1)
