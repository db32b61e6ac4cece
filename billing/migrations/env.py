"""Alembic environment of the billing database.

The body is shared by every service (:func:`shared.store.alembic_env.run_env`): it runs on the
connection :func:`shared.store.db.upgrade` passes in ``config.attributes["connection"]`` (or on an
engine built from the ``sqlalchemy.url`` main option when there is none), with
``render_as_batch`` on SQLite and the version table ``alembic_version_billing``.
"""

from __future__ import annotations

from billing.models import Base
from shared.store.alembic_env import run_env

run_env("billing", Base.metadata)
