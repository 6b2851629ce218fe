"""The example participants' Alembic environment: their own history, apart from the
engine's, in the version table ``saga_example_version``.

``sagactl db upgrade --scripts workers/migrations`` applies it (after the engine's);
``sagactl demo`` does so by itself.
"""

from __future__ import annotations

from engine.database import run_env
from workers.inventory import metadata as inventory
from workers.payment import metadata as payment
from workers.shipment import metadata as shipment

run_env(version_table="saga_example_version", target_metadata=[inventory, payment, shipment])
