"""Alembic migrations of the control-plane store (run by ``Store.migrate()``, no alembic.ini)."""
