"""Alembic environment of the gateway's database (see :mod:`shared.store.alembic_env`)."""

from gateway.models import Base
from shared.store.alembic_env import run_env

run_env("gateway", Base.metadata)
