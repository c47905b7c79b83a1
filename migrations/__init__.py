"""nanobot's Alembic migrations (installed as ``nanobot._migrations``)."""
