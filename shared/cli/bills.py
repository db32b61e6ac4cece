"""``paylab bills``: bills in billing's database (for load tests)."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.cli.console import fail, load_settings, out
from shared.cli.options import DataDir

app = typer.Typer(help="Bills in billing's database.", no_args_is_help=True)


@app.command("add")
def bills_add(
    count: Annotated[int, typer.Argument(min=1, max=1_000_000, help="How many bills.")] = 10_000,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Bill numbers are <prefix>-<7 digits>.")
    ] = "LOAD",
    data_dir: DataDir = None,
) -> None:
    """Add open bills for load tests, each payable once with the demo card (PIN 1234).

    Writes into billing's database (PAYLAB_BILLING_DB_URL or the data directory), also
    while the network runs; numbering continues after the bills of the same prefix.
    Locust picks from them with PAYLAB_LOAD_BILLS=<prefix>:<total> (loadtests/README.md).
    """
    import re

    from billing.demo_data import GENERATED_BILL_AMOUNT
    from shared.lab.bench import seed_bills
    from shared.store.db import DatabaseError

    if not re.fullmatch(r"[A-Z][A-Z0-9]{0,15}", prefix):
        fail("the prefix must be 1-16 capital letters or digits, starting with a letter")
    try:
        bills = seed_bills(load_settings(data_dir), count, prefix, append=True)
    except DatabaseError as exc:
        fail(f"cannot write billing's database: {exc}")
    total = int(bills[-1][0].rsplit("-", 1)[1]) + 1
    out.print(
        f"added {len(bills)} open bills {bills[0][0]} .. {bills[-1][0]}, "
        f"{GENERATED_BILL_AMOUNT} each (IDR minor units)"
    )
    out.print(f"for locust: PAYLAB_LOAD_BILLS={prefix}:{total}")
