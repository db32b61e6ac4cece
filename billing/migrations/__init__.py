"""Alembic environment of the billing database (run through :func:`shared.db.upgrade`)."""
