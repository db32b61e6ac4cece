"""``paylab db``: the databases' schemas, and billing's ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.cli.console import fail, load_settings, out
from shared.cli.options import DataDir

app = typer.Typer(
    help="Database commands: schemas, a new ledger, backup and restore.", no_args_is_help=True
)


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


@app.command("seed")
def db_seed(
    data_dir: DataDir = None,
    new_ledger: Annotated[
        bool,
        typer.Option(
            "--new-ledger",
            help="Give up the ledger this data directory served (its database was lost) "
            "and serve the database found, seeded if empty.",
        ),
    ] = False,
) -> None:
    """Create billing's ledger for a new network: schema, ledger id, demo data.

    Billing does this by itself on its first start in an empty data directory; it never
    seeds a database it finds empty after it has served one (see docs/store-and-forward.md,
    "A lost database"). Run this to prepare a network before starting it, or with
    --new-ledger to start over on purpose after a lost database.
    """
    from billing.ledger import LedgerLost, Start, open_ledger
    from billing.service import seed_demo
    from billing.store import BillingStore
    from hsm.keyfile import load_key_file
    from shared.errors import PaylabError
    from shared.store.db import DatabaseError, make_engine, session_factory, upgrade

    settings = load_settings(data_dir)
    url = settings.db_url("billing")
    engine = None
    try:
        upgrade(url, "billing:migrations")
        engine = make_engine(url)
        store = BillingStore(session_factory(engine))
        keys = load_key_file(settings.key_file)
        start, ledger_id = open_ledger(
            store,
            settings.data_dir,
            lambda: seed_demo(store, settings, keys),
            new_ledger=new_ledger,
        )
    except LedgerLost as exc:
        fail(str(exc))
        raise  # unreachable
    except (DatabaseError, OSError, PaylabError) as exc:
        fail(f"cannot prepare billing's database: {exc}")
        raise  # unreachable
    finally:
        if engine is not None:
            engine.dispose()
    said = {
        Start.NEW: "new ledger created and seeded with the demo data",
        Start.ADOPT: "ledger id given to the existing data",
        Start.SAME: "ledger already in place",
    }
    out.print(f"billing: {said[start]}: {ledger_id} ({url})")


@app.command("backup")
def db_backup(
    to: Annotated[
        Path | None,
        typer.Option(
            "--to",
            help="New directory for the backup (default: backups/paylab-<UTC time> beside "
            "the data directory).",
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Back up every service's database online, with a manifest (docs/operations.md).

    SQLite files are copied with SQLite's online backup API while the network runs;
    PostgreSQL databases with pg_dump. The manifest holds the time, each schema revision,
    the row counts and the SHA-256 of each file. Secrets (keys) are never backed up.
    """
    from shared.lab.backup import BackupError, backup, default_backup_dir

    settings = load_settings(data_dir)
    target = to if to is not None else default_backup_dir(settings)
    try:
        manifest = backup(settings, target)
    except BackupError as exc:
        fail(str(exc))
    for name, copy in manifest.databases.items():
        rows = sum(copy.rows.values())
        out.print(
            f"{name}: {copy.kind} {copy.file}, schema {copy.schema_revision}, {rows} rows, "
            f"sha256 {copy.sha256[:16]}..."
        )
    out.print(f"backup of {manifest.created_at.isoformat()} in {target}")


@app.command("restore")
def db_restore(
    source: Annotated[Path, typer.Argument(help="A directory made by `paylab db backup`.")],
    data_dir: DataDir = None,
) -> None:
    """Restore a backup into a stopped network, after verifying it against its manifest.

    Refuses (exit code 1, nothing touched) a backup whose files do not match the manifest's
    checksums, row counts or schema revisions, and a network that still runs. Billing's
    ledger marker is set to the backup's ledger, so billing starts on the restored ledger.
    """
    from shared.lab.backup import BackupError, restore

    settings = load_settings(data_dir)
    try:
        done = restore(settings, source)
    except BackupError as exc:
        fail(str(exc))
    for name, target in done.targets.items():
        out.print(f"{name}: restored into {target}")
    ledger = done.manifest.ledger_id
    if done.marker_before not in (None, ledger):
        out.print(f"billing: the data directory served ledger {done.marker_before}; now {ledger}")
    out.print(
        f"restored the backup of {done.manifest.created_at.isoformat()} (billing ledger "
        f"{ledger}); start the network, then run `paylab reconcile --receipts FILE`"
    )
