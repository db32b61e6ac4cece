"""``paylab db``: the databases' schemas."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.cli.console import fail, load_settings, out
from shared.cli.options import DataDir

app = typer.Typer(help="Database schema commands.", no_args_is_help=True)


@app.command("upgrade")
def db_upgrade(
    service: Annotated[str, typer.Option(help="billing, gateway, acquirer, or all.")] = "all",
    data_dir: DataDir = None,
) -> None:
    """Bring the databases to the newest schema (also done at every service start)."""
    from shared.store.db import DatabaseError, upgrade

    settings = load_settings(data_dir)
    names = ("acquirer", "gateway", "billing") if service == "all" else (service,)
    for name in names:
        if name not in ("acquirer", "gateway", "billing"):
            fail(f"{name!r} has no database; choose billing, gateway, acquirer or all")
        try:
            upgrade(settings.db_url(name), f"{name}:migrations")
        except DatabaseError as exc:
            fail(str(exc))
        out.print(f"{name}: schema up to date ({settings.db_url(name)})")
