"""Alembic environment and versions of saga-engine's tables (shipped in the wheel)."""
