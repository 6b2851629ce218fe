"""The engine's Alembic environment (its version table is ``alembic_version``).

Run by ``sagactl db upgrade`` (``engine.database.upgrade``), which finds this
directory by path; the ``alembic`` command line falls back to ``SAGA_DATABASE_URL``.
"""

from __future__ import annotations

from engine.database import ENGINE_VERSION_TABLE, run_env
from engine.store.schema import metadata

run_env(version_table=ENGINE_VERSION_TABLE, target_metadata=metadata)
