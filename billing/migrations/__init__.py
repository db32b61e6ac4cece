"""Alembic environment of the billing database (run through :func:`shared.store.db.upgrade`)."""
