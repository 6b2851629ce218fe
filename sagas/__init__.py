"""Saga definitions. Load one with ``--sagas sagas.order``."""
