"""Alembic environment of the acquirer's database (see :mod:`shared.store.alembic_env`)."""

from acquirer.models import Base
from shared.store.alembic_env import run_env

run_env("acquirer", Base.metadata)
