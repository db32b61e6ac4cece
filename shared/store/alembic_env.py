"""The body of every service's alembic ``env.py``.

Each service keeps its own migration scripts (``billing/migrations``,
``gateway/migrations``, ``acquirer/migrations``) and its own version table
(``alembic_version_<service>``), so the services can share one PostgreSQL database in a
deployment without their migration histories colliding.

Normally run by :func:`shared.store.db.upgrade`, which passes a live connection through
``config.attributes["connection"]``; the migrations then run on it and nothing here
commits or closes it. Without one (the ``alembic`` command line), an engine is built from
the ``sqlalchemy.url`` main option with :func:`shared.store.db.make_engine`. ``render_as_batch``
is on for SQLite, whose ``ALTER TABLE`` cannot change most things.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, MetaData

from shared.store.db import make_engine


def run_env(service: str, metadata: MetaData) -> None:
    """Run the migrations of ``service`` (called from its ``env.py``)."""
    config = context.config
    version_table = f"alembic_version_{service}"

    def configure(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
            version_table=version_table,
        )

    url = config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        if not url:
            raise RuntimeError(f"{service} migrations offline need a sqlalchemy.url option")
        context.configure(
            url=url,
            target_metadata=metadata,
            literal_binds=True,
            render_as_batch=url.startswith("sqlite"),
            version_table=version_table,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    connection = config.attributes.get("connection")
    if connection is not None:
        configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    if not url:
        raise RuntimeError(f"{service} migrations need a connection or a sqlalchemy.url option")
    engine = make_engine(url)
    try:
        with engine.connect() as fresh:
            configure(fresh)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
