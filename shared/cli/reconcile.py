"""``paylab reconcile``: every client's 00 against billing's postings in force."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from shared.cli.console import fail, load_settings, out
from shared.cli.options import DataDir, JsonOpt


def reconcile(
    data_dir: DataDir = None,
    as_json: JsonOpt = False,
    receipts: Annotated[
        Path | None,
        typer.Option(
            "--receipts",
            help="The clients' receipts (JSON lines, as POST /payments answers): after a "
            "restore, the approved payments the databases no longer know are reported lost.",
        ),
    ] = None,
) -> None:
    """Prove the money rule: every client answered 00 has a posting in force, and only they.

    Reads the acquirer's records (what each client, API or terminal, was answered), the
    gateway's journal and queue, and billing's postings (PAYLAB_*_DB_URL, or the SQLite
    files in the data directory). Reports LOST (answered 00, no posting in force),
    DUPLICATED (posted twice) and ORPHAN (posted, never approved, not reversed) with
    examples, journal gaps, and the transactions still pending in the queue. Exit code 1
    when anything is lost, duplicated or otherwise mismatched.
    """
    from shared.lab.reconcile.receipts import ReceiptsError, read_receipts
    from shared.lab.reconcile.sources import reconcile_databases
    from shared.store.db import DatabaseError

    settings = load_settings(data_dir)
    try:
        kept = read_receipts(receipts) if receipts is not None else []
        report = reconcile_databases(
            settings.db_url("gateway"),
            settings.db_url("billing"),
            settings.db_url("acquirer"),
            kept,
        )
    except ReceiptsError as exc:
        fail(str(exc))
        raise  # unreachable
    except DatabaseError as exc:
        fail(f"cannot read the databases: {exc}")
        raise  # unreachable
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        for line in report_lines(report):
            out.print(line)
    if not report.clean:
        raise typer.Exit(1)


def report_lines(report: Any) -> list[str]:
    """The reconciliation report as console lines (rich markup)."""
    colour = "green" if report.clean else "bold red"
    lines = [
        f"checked {report.checked} transactions: approved {report.approved}, posted "
        f"{report.posted}, reversed {report.reversed}; {report.pending} pending",
        f"[{colour}]lost {report.lost}, duplicated {report.duplicated}, orphans "
        f"{report.orphans}, {len(report.mismatches)} mismatches[/]",
    ]
    if not report.client_side:
        lines.append(
            "[yellow]no acquirer records: clients' answers taken from the gateway's journal[/]"
        )
    if report.journal_gaps:
        lines.append(
            f"[yellow]journal gaps: {len(report.journal_gaps)} approvals the journal does not "
            f"hold, e.g. {', '.join(report.journal_gaps[:3])}[/]"
        )
    by_kind: dict[str, list[Any]] = {}
    for m in report.mismatches:
        by_kind.setdefault(m.kind, []).append(m)
    for kind, items in sorted(by_kind.items()):
        lines.append(f"  [red]{kind}[/]: {len(items)}")
        for m in items[:5]:
            lines.append(f"    {m.key}: {escape(m.detail)}")
        if len(items) > 5:
            lines.append(f"    ... and {len(items) - 5} more (--json lists them all)")
    return lines
