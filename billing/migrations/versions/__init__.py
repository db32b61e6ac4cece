"""Hand-written revisions of the billing schema, oldest first (alembic ignores this file)."""
