"""Backup and restore of the network's databases, with a manifest that proves a backup.

What a backup is
    A directory holding one consistent copy of each service's database (the acquirer's
    records, the gateway's journal and queue, billing's ledger), billing's ledger marker
    and ``manifest.json``: when it was taken, each database's schema revision (alembic),
    its row count per table, its size and its SHA-256. SQLite databases are copied with
    SQLite's online backup API (a consistent snapshot while the services run and write);
    PostgreSQL databases with ``pg_dump --format=custom`` when ``pg_dump`` is installed.
    Secrets are never part of a backup: the data key, the PAN hash key, the HSM key file
    and the TLS keys are kept (and restored) apart, see docs/operations.md.

What a restore does
    :func:`verify` first: a manifest that does not parse, a file missing, a checksum or a
    row count that differs, or a billing ledger id that is not the marker's, refuse the
    whole restore before anything is touched. Then each database replaces the target (a
    SQLite file is copied beside the target and renamed over it; its stale ``-wal`` and
    ``-shm`` files are removed first) and billing's marker is written with the backup's
    ledger id, so billing starts on the restored ledger. :func:`restore` refuses to run
    while a service of the network answers on its HTTP port.

The functions here are synchronous and do file and database I/O only; the CLI
(``paylab db backup``, ``paylab db restore``) prints and exits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from billing.ledger import MARKER_NAME, read_marker, write_marker
from shared.errors import PaylabError
from shared.ops.settings import Settings
from shared.store.db import make_engine

if TYPE_CHECKING:
    from shared.lab.course import Recovery

#: The services that own a database, in the order they are backed up and restored.
DATABASES: Final = ("acquirer", "gateway", "billing")
#: Every service of the network (a restore needs them all stopped).
SERVICES: Final = ("acquirer", "gateway", "billing", "hsm")
MANIFEST: Final = "manifest.json"
FORMAT: Final = 1


class BackupError(PaylabError):
    """A backup could not be taken, or a restore could not be done."""


class BackupInvalid(BackupError):
    """The backup does not verify against its manifest: nothing was restored."""


@dataclass(frozen=True, slots=True)
class DatabaseCopy:
    """One database in a backup (an entry of the manifest)."""

    service: str
    kind: str  # "sqlite" or "postgres"
    file: str
    sha256: str
    size: int
    schema_revision: str | None
    rows: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": self.file,
            "sha256": self.sha256,
            "bytes": self.size,
            "schema_revision": self.schema_revision,
            "rows": dict(sorted(self.rows.items())),
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``manifest.json`` says of a backup."""

    created_at: datetime
    databases: dict[str, DatabaseCopy]
    ledger_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "created_at": self.created_at.isoformat(),
            "ledger_id": self.ledger_id,
            "databases": {name: db.as_dict() for name, db in self.databases.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse a manifest (raises :class:`BackupInvalid` on anything unexpected)."""
        try:
            if data["format"] != FORMAT:
                raise BackupInvalid(f"manifest format {data['format']!r}, expected {FORMAT}")
            dbs = {
                name: DatabaseCopy(
                    service=name,
                    kind=str(d["kind"]),
                    file=str(d["file"]),
                    sha256=str(d["sha256"]),
                    size=int(d["bytes"]),
                    schema_revision=d["schema_revision"],
                    rows={str(t): int(n) for t, n in d["rows"].items()},
                )
                for name, d in data["databases"].items()
            }
            return cls(datetime.fromisoformat(data["created_at"]), dbs, data["ledger_id"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackupInvalid(f"the manifest is not a paylab backup manifest: {exc!r}") from exc


def default_backup_dir(settings: Settings, now: datetime | None = None) -> Path:
    """``backups/<UTC time>`` beside the data directory (not inside it: a backup must
    survive the loss of the data directory)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return settings.data_dir.resolve().parent / "backups" / f"paylab-{stamp}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if not parsed.get_backend_name().startswith("sqlite"):
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise BackupError(f"{url}: an in-memory database cannot be backed up")
    return Path(parsed.database)


def _libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as pg_dump/pg_restore take it (no driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_schema_args(url: str) -> list[str]:
    """``--schema=X`` when the URL confines the database to one schema (libpq's
    ``options=-csearch_path=X``): only that schema is dumped and restored."""
    options = make_url(url).query.get("options")
    text_ = " ".join(options) if isinstance(options, tuple) else (options or "")
    found = re.search(r"search_path=([A-Za-z0-9_]+)", text_)
    return [f"--schema={found.group(1)}"] if found else []


def _sqlite_facts(path: Path) -> tuple[str | None, dict[str, int]]:
    """Schema revision and row count per table of a SQLite file (opened read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        rows = {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}
        revision = None
        for table in (t for t in tables if t.startswith("alembic_version")):
            found = conn.execute(f'SELECT version_num FROM "{table}"').fetchone()
            revision = None if found is None else str(found[0])
        return revision, rows
    finally:
        conn.close()


def _sqlite_ledger(path: Path) -> str | None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found = conn.execute("SELECT ledger_id FROM ledger WHERE id = 1").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return None if found is None else str(found[0])


def _db_facts(url: str) -> tuple[str | None, dict[str, int], str | None]:
    """Schema revision, row counts and ledger id of a live database (any backend)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            names = sorted(inspect(conn).get_table_names())
            rows = {
                t: int(conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one())
                for t in names
            }
            revision = None
            for table in (t for t in names if t.startswith("alembic_version")):
                revision = conn.execute(text(f'SELECT version_num FROM "{table}"')).scalar()
            ledger = None
            if "ledger" in names:
                ledger = conn.execute(text("SELECT ledger_id FROM ledger WHERE id = 1")).scalar()
            return (
                None if revision is None else str(revision),
                rows,
                None if ledger is None else str(ledger),
            )
    finally:
        engine.dispose()


def _copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (the online backup API), as one
    self-contained file (rollback journal mode: no ``-wal`` file belongs to it)."""
    if not source.exists():
        raise BackupError(f"{source} does not exist")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
        dst.commit()
    finally:
        dst.close()
        src.close()


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} is not installed: it is needed for a PostgreSQL database")
    return found


def backup(settings: Settings, target: Path, services: Iterable[str] = DATABASES) -> Manifest:
    """Back up ``services``' databases and billing's marker into ``target`` (created; it must
    be empty or absent), and write the manifest last.

    Raises:
        BackupError: a database is missing, a tool is missing, or a copy failed.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty: a backup goes into a new directory")
    target.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC)
    copies: dict[str, DatabaseCopy] = {}
    ledger_id: str | None = None
    for name in services:
        url = settings.db_url(name)
        path = _sqlite_path(url)
        try:
            if path is not None:
                file = f"{name}.db"
                _copy_sqlite(path, target / file)
                revision, rows = _sqlite_facts(target / file)
                if name == "billing":
                    ledger_id = _sqlite_ledger(target / file)
                kind = "sqlite"
            else:
                file = f"{name}.dump"
                subprocess.run(
                    [
                        _tool("pg_dump"),
                        "--format=custom",
                        *_pg_schema_args(url),
                        f"--file={target / file}",
                        _libpq_url(url),
                    ],
                    check=True,
                    capture_output=True,
                    timeout=600,
                )
                # Counted after the dump: a busy PostgreSQL may differ by the writes between.
                revision, rows, ledger = _db_facts(url)
                if name == "billing":
                    ledger_id = ledger
                kind = "postgres"
        except (sqlite3.Error, OSError) as exc:
            raise BackupError(f"cannot back up {name}'s database: {exc}") from exc
        except subprocess.CalledProcessError as exc:
            raise BackupError(
                f"pg_dump of {name}'s database failed: {exc.stderr.decode(errors='replace')}"
            ) from exc
        copies[name] = DatabaseCopy(
            name,
            kind,
            file,
            sha256_of(target / file),
            (target / file).stat().st_size,
            revision,
            rows,
        )
    manifest = Manifest(created, copies, ledger_id)
    tmp = target / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.as_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target / MANIFEST)
    return manifest


def verify(source: Path) -> Manifest:
    """Check a backup against its manifest: every file there, its size and SHA-256, and for
    SQLite its integrity, row counts, schema revision and billing's ledger id.

    Raises:
        BackupInvalid: the first thing that does not verify.
    """
    source = Path(source)
    try:
        data = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BackupInvalid(f"{source} has no {MANIFEST}: not a paylab backup") from exc
    except (OSError, ValueError) as exc:
        raise BackupInvalid(f"{source / MANIFEST} cannot be read: {exc}") from exc
    manifest = Manifest.from_dict(data)
    if not manifest.databases:
        raise BackupInvalid("the manifest names no database")
    for name, copy in manifest.databases.items():
        path = source / copy.file
        if Path(copy.file).name != copy.file:
            raise BackupInvalid(f"{name}: file name {copy.file!r} leaves the backup directory")
        if not path.is_file():
            raise BackupInvalid(f"{name}: {copy.file} is missing")
        if path.stat().st_size != copy.size:
            raise BackupInvalid(
                f"{name}: {copy.file} has {path.stat().st_size} bytes, "
                f"the manifest says {copy.size}"
            )
        if sha256_of(path) != copy.sha256:
            raise BackupInvalid(f"{name}: {copy.file} does not match its SHA-256")
        if copy.kind == "sqlite":
            try:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                try:
                    status = conn.execute("PRAGMA integrity_check").fetchone()[0]
                finally:
                    conn.close()
                revision, rows = _sqlite_facts(path)
            except sqlite3.Error as exc:
                raise BackupInvalid(f"{name}: {copy.file} is not a SQLite database: {exc}") from exc
            if status != "ok":
                raise BackupInvalid(f"{name}: integrity check: {status}")
            if rows != copy.rows or revision != copy.schema_revision:
                raise BackupInvalid(
                    f"{name}: row counts or schema revision differ from the manifest"
                )
            if name == "billing" and _sqlite_ledger(path) != manifest.ledger_id:
                raise BackupInvalid("billing's database holds another ledger id than the manifest")
        elif copy.kind != "postgres":
            raise BackupInvalid(f"{name}: unknown kind {copy.kind!r}")
    return manifest


def running_services(settings: Settings, services: Iterable[str] = SERVICES) -> list[str]:
    """The services of ``settings`` that accept a connection on their HTTP port."""
    found = []
    for name in services:
        try:
            with socket.create_connection((settings.host, settings.http_port(name)), timeout=0.5):
                found.append(name)
        except OSError:
            continue
    return found


@dataclass(frozen=True, slots=True)
class Restored:
    """What :func:`restore` did."""

    manifest: Manifest
    targets: dict[str, str]
    marker_before: str | None


def restore(settings: Settings, source: Path) -> Restored:
    """Restore the backup in ``source`` over the databases ``settings`` name, into a stopped
    network, and write billing's marker with the backup's ledger id.

    Raises:
        BackupInvalid: the backup does not verify (nothing touched).
        BackupError: a service still runs, or a copy failed.
    """
    manifest = verify(source)
    running = running_services(settings)
    if running:
        raise BackupError(
            f"stop the network first: {', '.join(running)} still answer(s); a restore "
            "replaces the databases under the services"
        )
    targets: dict[str, str] = {}
    for name, copy in manifest.databases.items():
        url = settings.db_url(name)
        path = _sqlite_path(url)
        if (path is None) != (copy.kind == "postgres"):
            raise BackupError(
                f"{name}: the backup holds a {copy.kind} database, the configuration names "
                f"{make_url(url).get_backend_name()}"
            )
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".restore")
                shutil.copyfile(Path(source) / copy.file, tmp)
                for stale in (
                    path.with_name(path.name + "-wal"),
                    path.with_name(path.name + "-shm"),
                ):
                    stale.unlink(missing_ok=True)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                targets[name] = str(path)
            else:
                subprocess.run(
                    [
                        _tool("pg_restore"),
                        "--clean",
                        "--if-exists",
                        "--no-owner",
                        f"--dbname={_libpq_url(url)}",
                        str(Path(source) / copy.file),
                    ],
                    check=True,
                    capture_output=True,
                    timeout=600,
                )
                targets[name] = make_url(url).render_as_string(hide_password=True)
        except OSError as exc:
            raise BackupError(f"cannot restore {name}'s database: {exc}") from exc
        except subprocess.CalledProcessError as exc:
            raise BackupError(
                f"pg_restore of {name}'s database failed: {exc.stderr.decode(errors='replace')}"
            ) from exc
    before = read_marker(settings.data_dir)
    if manifest.ledger_id is not None:
        write_marker(settings.data_dir, manifest.ledger_id)
    return Restored(manifest, targets, before)


def recovery_facts(settings: Settings, backup_dir: Path, receipts: Path | None) -> Recovery:
    """Lab 7's facts (:class:`shared.lab.course.Recovery`): does the backup verify, which
    approved receipts were completed after it, and what reconciliation of the databases
    ``settings`` name against those receipts reports. Never raises: errors become facts."""
    from shared.lab.course import Recovery
    from shared.lab.reconcile.receipts import (
        RECEIPT_KEY,
        ReceiptsError,
        read_receipts,
    )
    from shared.lab.reconcile.sources import reconcile_databases
    from shared.store.db import DatabaseError

    try:
        manifest = verify(backup_dir)
    except BackupError as exc:
        return Recovery(str(backup_dir), backup_error=str(exc))
    if receipts is None:
        return Recovery(
            str(backup_dir),
            ledger_id=manifest.ledger_id,
            reconcile_error="give the clients' receipts: --receipts FILE",
        )
    try:
        kept = read_receipts(receipts)
        report = reconcile_databases(
            settings.db_url("gateway"),
            settings.db_url("billing"),
            settings.db_url("acquirer"),
            kept,
        )
    except (ReceiptsError, DatabaseError) as exc:
        return Recovery(str(backup_dir), ledger_id=manifest.ledger_id, reconcile_error=str(exc))
    after = frozenset(
        str(r["rrn"])
        for r in kept
        if r.get("kind", "payment") == "payment"
        and r.get("response_code") == "00"
        and _completed_after(r, manifest.created_at)
    )
    lost = frozenset(
        m.key.removeprefix(RECEIPT_KEY)
        for m in report.mismatches
        if m.kind == "lost" and m.key.startswith(RECEIPT_KEY)
    )
    other = sum(
        1 for m in report.mismatches if not (m.kind == "lost" and m.key.startswith(RECEIPT_KEY))
    )
    return Recovery(
        str(backup_dir),
        ledger_id=manifest.ledger_id,
        approved_after=after,
        lost=lost,
        other=other,
    )


def _completed_after(receipt: Mapping[str, Any], moment: datetime) -> bool:
    stamp = receipt.get("completed_at") or receipt.get("created_at")
    if not stamp:
        return False
    try:
        when = datetime.fromisoformat(str(stamp))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when > moment


__all__ = [
    "DATABASES",
    "MANIFEST",
    "MARKER_NAME",
    "BackupError",
    "BackupInvalid",
    "DatabaseCopy",
    "Manifest",
    "Restored",
    "backup",
    "default_backup_dir",
    "recovery_facts",
    "restore",
    "running_services",
    "verify",
]
