"""The databases: engines, transactions and migrations, the alembic environment, group
commit, and the vault that seals stored messages."""
